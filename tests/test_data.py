"""Data loading, splits, augmentation and batching (offline, on small hand-made files)."""
import functools
import gzip
import os
import pickle
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsst_jax import data
from rsst_jax.data import DataError


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


def test_digits_split_sizes_shapes_and_dtypes(digits):
    assert (len(digits.train_x), len(digits.val_x), len(digits.test_x)) == (1257, 270, 270)
    assert len(digits.train_y) + len(digits.val_y) + len(digits.test_y) == 1797
    assert digits.image_shape == (32, 32, 1)
    assert digits.train_x.dtype == np.uint8 and digits.train_y.dtype == np.int32
    assert digits.num_classes == 10 and digits.flip is False
    assert digits.train_x.min() == 0 and digits.train_x.max() == 255


def test_digits_stratified_and_labels_match_sklearn(digits):
    from sklearn.datasets import load_digits

    expected = np.bincount(load_digits().target, minlength=10)
    got = sum(np.bincount(y, minlength=10)
              for y in (digits.train_y, digits.val_y, digits.test_y))
    np.testing.assert_array_equal(got, expected)
    for y in (digits.train_y, digits.val_y, digits.test_y):
        counts = np.bincount(y, minlength=10)
        assert counts.min() > 0
        # Stratified: each split's class shares are within 1 sample of the whole set's.
        np.testing.assert_allclose(counts, expected * len(y) / 1797, atol=1.0)


def test_digits_deterministic_and_independent_of_seed(digits):
    other = data.load_dataset("digits", seed=123)
    for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(digits, k), getattr(other, k))
    assert digits.mean == other.mean and digits.std == other.std


def test_digits_mean_std_from_training_split(digits):
    x = digits.train_x / 255.0
    np.testing.assert_allclose(digits.mean, [x.mean()], rtol=1e-9)
    np.testing.assert_allclose(digits.std, [x.std()], rtol=1e-9)


def test_upsample_keeps_constants_and_corners():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (3, 8, 8))
    up = data._upsample_bilinear(images, 32)
    assert up.shape == (3, 32, 32)
    # Half-pixel centres: the outermost output pixels sit beyond the first input centre.
    np.testing.assert_allclose(up[:, 0, 0], images[:, 0, 0])
    np.testing.assert_allclose(up[:, -1, -1], images[:, -1, -1])
    np.testing.assert_allclose(data._upsample_bilinear(np.full((1, 8, 8), 7.0), 32), 7.0)


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="cifar100.*tiny-imagenet"):
        data.load_dataset("imagenet")


# ----------------------------------------------------------------------------- IDX files


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def _numbered_images(n, h, w, c=None, seed=0):
    """Random images whose first two bytes encode their index, so splits are traceable."""
    shape = (n, h, w) if c is None else (n, h, w, c)
    images = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    flat = images.reshape(n, -1)
    flat[:, 0], flat[:, 1] = np.arange(n) // 256, np.arange(n) % 256
    return images


def _image_ids(images):
    flat = images.reshape(len(images), -1).astype(int)
    return flat[:, 0] * 256 + flat[:, 1]


def _write_fashion(directory, n_train=120, n_test=20, gz=True, train_labels=None,
                   train_shape=(28, 28)):
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": _numbered_images(n_train, *train_shape),
        "train-labels-idx1-ubyte": (rng.integers(0, 10, n_train, dtype=np.uint8)
                                    if train_labels is None else train_labels),
        "t10k-images-idx3-ubyte": _numbered_images(n_test, 28, 28, seed=2),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        raw = _idx_bytes(array)
        if gz:
            with gzip.open(os.path.join(directory, name + ".gz"), "wb") as f:
                f.write(raw)
        else:
            with open(os.path.join(directory, name), "wb") as f:
                f.write(raw)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_idx_files(tmp_path, gz):
    arrays = _write_fashion(tmp_path, gz=gz)
    ds = data.load_dataset("fashion_mnist", str(tmp_path))
    # val = n_train // 12: 5000 of 60000 on the real files, 10 of 120 here.
    assert (len(ds.train_x), len(ds.val_x), len(ds.test_x)) == (110, 10, 20)
    assert ds.image_shape == (28, 28, 1) and ds.num_classes == 10 and not ds.flip
    np.testing.assert_array_equal(ds.test_x[..., 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_y, arrays["t10k-labels-idx1-ubyte"])
    train_ids, val_ids = _image_ids(ds.train_x), _image_ids(ds.val_x)
    assert sorted(np.concatenate([train_ids, val_ids])) == list(range(120))
    labels = arrays["train-labels-idx1-ubyte"]
    np.testing.assert_array_equal(ds.train_y, labels[train_ids])
    np.testing.assert_array_equal(ds.val_y, labels[val_ids])
    np.testing.assert_array_equal(ds.val_x[..., 0],
                                  arrays["train-images-idx3-ubyte"][val_ids])


def test_fashion_mnist_missing_directory_says_what_to_put_where(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        data.load_dataset("fashion_mnist", str(missing))
    message = str(info.value)
    assert str(missing) in message and "--dataset digits" in message
    for name in data._FASHION_FILES:
        assert name in message
    assert "\n" not in message


def test_fashion_mnist_truncated_gz_names_the_file(tmp_path):
    _write_fashion(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        data.load_dataset("fashion_mnist", str(tmp_path))


def test_fashion_mnist_short_payload_names_the_file(tmp_path):
    _write_fashion(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        data.load_dataset("fashion_mnist", str(tmp_path))


def test_fashion_mnist_labels_out_of_range(tmp_path):
    labels = np.zeros(120, np.uint8)
    labels[7] = 10
    _write_fashion(tmp_path, train_labels=labels)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz.*\[0, 10\)"):
        data.load_dataset("fashion_mnist", str(tmp_path))


def test_fashion_mnist_wrong_image_shape_names_the_file(tmp_path):
    _write_fashion(tmp_path, train_shape=(27, 28))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*28x28"):
        data.load_dataset("fashion_mnist", str(tmp_path))


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_system_copy():
    ds = data.load_dataset("fashion_mnist")
    assert (len(ds.train_x), len(ds.val_x), len(ds.test_x)) == (55000, 5000, 10000)
    assert ds.image_shape == (28, 28, 1)


# ----------------------------------------------------------------------------- CIFAR


def _cifar_pickle(images, labels, label_key):
    # The archive stores each image channel-major: 1024 R, 1024 G, 1024 B values.
    batch = {b"data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072),
             label_key: [int(label) for label in labels]}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [int(label) // 5 for label in labels]
    return pickle.dumps(batch)


def _write_cifar(root, name, n_train=20, n_test=6, bad_label=False):
    """Write a miniature python archive under `root`.

    Returns (folder, train_x, train_y, test_x, test_y); train image i carries id i.
    """
    is10 = name == "cifar10"
    folder = root / ("cifar-10-batches-py" if is10 else "cifar-100-python")
    folder.mkdir(parents=True)
    key, classes = (b"labels", 10) if is10 else (b"fine_labels", 100)
    rng = np.random.default_rng(3)
    train_x = _numbered_images(n_train, 32, 32, 3, seed=4)
    train_y = rng.integers(0, classes, n_train)
    test_x = _numbered_images(n_test, 32, 32, 3, seed=5)
    test_y = rng.integers(0, classes, n_test)
    files = [f"data_batch_{i}" for i in range(1, 6)] if is10 else ["train"]
    for f, idx in zip(files, np.array_split(np.arange(n_train), len(files))):
        labels = train_y[idx].copy()
        if bad_label:
            labels[0] = classes
        (folder / f).write_bytes(_cifar_pickle(train_x[idx], labels, key))
    (folder / ("test_batch" if is10 else "test")).write_bytes(
        _cifar_pickle(test_x, test_y, key))
    return folder, train_x, train_y, test_x, test_y


def _check_cifar(ds, name, train_x, train_y, test_x, test_y):
    assert ds.name == name and ds.flip is True
    assert ds.num_classes == (10 if name == "cifar10" else 100)
    assert ds.image_shape == (32, 32, 3)
    # val = n_train // 10: 5000 of 50000 on the real archive, 2 of 20 here.
    assert (len(ds.train_x), len(ds.val_x), len(ds.test_x)) == (18, 2, len(test_x))
    np.testing.assert_array_equal(ds.test_x, test_x)
    np.testing.assert_array_equal(ds.test_y, test_y)
    ids = np.concatenate([_image_ids(ds.train_x), _image_ids(ds.val_x)])
    assert sorted(ids) == list(range(20))
    np.testing.assert_array_equal(ds.train_x, train_x[_image_ids(ds.train_x)])
    np.testing.assert_array_equal(ds.train_y, train_y[_image_ids(ds.train_x)])
    assert len(ds.mean) == len(ds.std) == 3


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_python_archive(tmp_path, name):
    folder, *arrays = _write_cifar(tmp_path, name)
    _check_cifar(data.load_dataset(name, str(tmp_path)), name, *arrays)
    # data_dir may also be the archive folder itself.
    _check_cifar(data.load_dataset(name, str(folder)), name, *arrays)


def test_cifar10_from_unextracted_tarball(tmp_path):
    folder, *arrays = _write_cifar(tmp_path / "src", "cifar10")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    _check_cifar(data.load_dataset("cifar10", str(tmp_path)), "cifar10", *arrays)


def test_cifar_truncated_tarball_names_the_file(tmp_path):
    folder, *_ = _write_cifar(tmp_path / "src", "cifar10")
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    tar_path.write_bytes(tar_path.read_bytes()[:-200])
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        data.load_dataset("cifar10", str(tmp_path))


def test_cifar_labels_out_of_range_names_the_file(tmp_path):
    _write_cifar(tmp_path, "cifar100", bad_label=True)
    with pytest.raises(DataError, match=r"cifar-100-python.train.*\[0, 100\)"):
        data.load_dataset("cifar100", str(tmp_path))


def test_cifar_corrupt_batch_names_the_file(tmp_path):
    folder, *_ = _write_cifar(tmp_path, "cifar10")
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3"):
        data.load_dataset("cifar10", str(tmp_path))


def test_cifar_missing_says_what_to_put_where(tmp_path):
    with pytest.raises(DataError) as info:
        data.load_dataset("cifar10", str(tmp_path))
    message = str(info.value)
    assert str(tmp_path) in message and "cifar-10-batches-py" in message
    assert "--dataset digits" in message and "\n" not in message


@pytest.mark.parametrize("name,shape,classes", [("cifar10", (32, 32, 3), 10),
                                                ("cifar100", (32, 32, 3), 100),
                                                ("fashion_mnist", (28, 28, 1), 10)])
def test_tfds_data_dir_with_mock_data(tmp_path, name, shape, classes):
    tfds = pytest.importorskip("tensorflow_datasets")
    (tmp_path / name).mkdir()  # What a prepared TFDS data_dir holds for this data set.
    with tfds.testing.mock_data(num_examples=30):
        ds = data.load_dataset(name, str(tmp_path))
        expected_test = tfds.data_source(name, split="test", download=False)[0]["image"]
    val = 30 // (12 if name == "fashion_mnist" else 10)
    assert (len(ds.train_x), len(ds.val_x), len(ds.test_x)) == (30 - val, val, 30)
    assert ds.image_shape == shape and ds.num_classes == classes
    assert ds.train_x.dtype == np.uint8 and ds.train_y.dtype == np.int32
    assert ds.train_y.min() >= 0 and ds.train_y.max() < classes
    np.testing.assert_array_equal(ds.test_x[0], expected_test)


def test_tfds_unreadable_dir_is_a_data_error(tmp_path):
    (tmp_path / "cifar10").mkdir()  # Present but never prepared.
    with pytest.raises(DataError, match="TFDS cifar10.*--dataset digits"):
        data.load_dataset("cifar10", str(tmp_path))


# ----------------------------------------------------------------------------- tiny-imagenet


def test_tiny_imagenet_folder_layout(tmp_path):
    from PIL import Image

    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(0)
    for wnid in wnids:
        image_dir = root / "train" / wnid / "images"
        image_dir.mkdir(parents=True)
        for i in range(10):
            mode = "L" if i == 0 else "RGB"  # The real set has a few grayscale JPEGs.
            shape = (64, 64) if mode == "L" else (64, 64, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                image_dir / f"{wnid}_{i}.JPEG")
    lines = []
    for i, wnid in enumerate(["n03", "n01", "n01", "n02"]):
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(
            root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")

    ds = data.load_dataset("tiny-imagenet", str(tmp_path))
    assert (len(ds.train_x), len(ds.val_x), len(ds.test_x)) == (27, 3, 4)
    assert ds.image_shape == (64, 64, 3) and ds.num_classes == 3 and ds.flip
    np.testing.assert_array_equal(ds.test_y, [2, 0, 0, 1])  # Sorted wnids n01, n02, n03.
    assert np.abs(ds.test_x[3].astype(int) - 120).max() <= 2  # JPEG of a flat image.
    counts = np.bincount(np.concatenate([ds.train_y, ds.val_y]), minlength=3)
    np.testing.assert_array_equal(counts, [10, 10, 10])


def test_tiny_imagenet_missing(tmp_path):
    with pytest.raises(DataError, match="tiny-imagenet-200.*--dataset digits"):
        data.load_dataset("tiny-imagenet", str(tmp_path))


# ----------------------------------------------------------------------------- on device


def test_normalize_matches_numpy():
    images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    out = jax.jit(data.normalize)(images, mean, std)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, (images / 255.0 - np.array(mean)) / np.array(std),
                               rtol=1e-5, atol=1e-5)


def test_augment_identity_without_pad_or_flip():
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    out = data.augment(jax.random.key(0), images, flip=False, pad=0)
    assert out.dtype == jnp.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(out, images)


def test_augment_crops_are_padded_shifts_and_half_are_flipped():
    n, size, pad = 2000, 12, 4
    # Pixel value encodes position (1 + y * size + x), so each output reveals its crop.
    image = (1 + np.arange(size * size, dtype=np.uint8)).reshape(size, size, 1)
    images = np.broadcast_to(image, (n, size, size, 1))
    run = jax.jit(functools.partial(data.augment, flip=True, pad=pad))
    out = np.asarray(run(jax.random.key(1), images))
    assert out.shape == images.shape and out.dtype == np.uint8

    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    centre = size // 2  # Never in the zero border, since pad < size / 2.
    flipped = out[:, centre, centre + 1, 0].astype(int) - out[:, centre, centre, 0] == -1
    offsets = set()
    for k in range(n):
        crop = out[k, :, ::-1] if flipped[k] else out[k]
        source = int(crop[centre, centre, 0]) - 1
        dy, dx = source // size - centre + pad, source % size - centre + pad
        np.testing.assert_array_equal(crop, padded[dy:dy + size, dx:dx + size])
        offsets.add((dy, dx))
    assert offsets == {(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)}
    assert 0.45 < flipped.mean() < 0.55


def test_augment_without_flip_never_flips():
    image = (1 + np.arange(64, dtype=np.uint8)).reshape(8, 8, 1)
    out = np.asarray(data.augment(jax.random.key(2), np.broadcast_to(image, (200, 8, 8, 1)),
                                  flip=False, pad=0))
    np.testing.assert_array_equal(out, np.broadcast_to(image, out.shape))


def test_to_device(digits):
    arrays = data.to_device(digits)
    assert set(arrays) == {"train_x", "train_y", "val_x", "val_y", "test_x", "test_y"}
    for k, v in arrays.items():
        assert isinstance(v, jax.Array)
        assert v.dtype == (jnp.uint8 if k.endswith("_x") else jnp.int32)
        np.testing.assert_array_equal(v, getattr(digits, k))


def test_dataset_arrays_are_read_only(digits):
    with pytest.raises(ValueError):
        digits.train_x[0, 0, 0, 0] = 1


def test_train_subset_is_stratified_fixed_and_exact():
    """--train_subset N: exactly N training images, each class its share (within one
    image), the same images whatever the seed, validation and test untouched, mean and std
    of the subset; N at least the split is the split itself."""
    from rsst_jax import config as config_lib
    ds = data.load_dataset("digits")
    sub = data.train_subset(ds, 500)
    assert len(sub.train_y) == 500 and sub.val_x is ds.val_x and sub.test_y is ds.test_y
    share = np.bincount(ds.train_y, minlength=10) * 500 / len(ds.train_y)
    assert np.all(np.abs(np.bincount(sub.train_y, minlength=10) - share) < 1)
    rows = {r.tobytes() for r in ds.train_x.reshape(len(ds.train_y), -1)}
    assert all(r.tobytes() in rows for r in sub.train_x.reshape(500, -1))  # drawn from train
    again = data.train_subset(data.load_dataset("digits", seed=7), 500)
    np.testing.assert_array_equal(again.train_x, sub.train_x)
    want = sub.train_x.astype(np.float64) / 255.0
    assert sub.mean == pytest.approx((want.mean(),)) and sub.std == pytest.approx((want.std(),))
    assert data.train_subset(ds, 5000) is ds and data.train_subset(ds, None) is ds
    with pytest.raises(config_lib.ConfigError, match="--train_subset must be >= 1"):
        config_lib.validate(config_lib.Config.from_dict(dict(train_subset=0)))
    assert config_lib.facts("train_subset").semantic  # a resume must agree on it
    assert not config_lib.facts("train_subset").groupable  # one data set per program
