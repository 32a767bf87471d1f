"""Image classification data: offline loaders, a fixed train/val/test split, and jit-side
augmentation and batching.

Every loader returns a `Dataset` of uint8 NHWC images and int32 labels held in host
memory; `to_device` moves it to the accelerator once, and the training step gathers
batches with the indices from `rsst_jax.rounds.epoch_indices` and augments them with
`augment`, all inside one compiled program.

The validation split is carved out of the official training set by a fixed
permutation (`_SPLIT_SEED`), independent of the run's seed, so runs with different seeds
select models on the same validation images and never on the test set.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import math
import os
import pickle
import tarfile
import zlib
from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

DATASETS = ("digits", "fashion_mnist", "cifar10", "cifar100", "tiny-imagenet")

# One image (H, W, C) of each data set as its loader delivers it. Checkpoints record
# their image shape; this is what a checkpoint that predates that falls back to.
IMAGE_SHAPES = {"digits": (32, 32, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3),
                "cifar100": (32, 32, 3), "tiny-imagenet": (64, 64, 3)}

_DEFAULT_DIRS = {
    "digits": None,
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",
    "cifar10": "./data",
    "cifar100": "./data",
    "tiny-imagenet": "./data",
}

# Fixed so that splits never change between runs, seeds or machines.
_SPLIT_SEED = 0

_FASHION_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


class DataError(Exception):
    """A data set is missing or malformed; the message says what to put where."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Train/val/test splits in host memory.

    Images are uint8 `[N, H, W, C]`, labels int32 `[N]` in `[0, num_classes)`.
    `mean`/`std` are per channel on the 0..1 scale, computed from `train_x`.
    `flip` says whether horizontal flips are label-preserving augmentation.
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool

    def __post_init__(self):
        xs = (self.train_x, self.val_x, self.test_x)
        ys = (self.train_y, self.val_y, self.test_y)
        chex.assert_rank(xs, 4)
        chex.assert_rank(ys, 1)
        chex.assert_type(xs, np.uint8)
        chex.assert_type(ys, np.int32)
        chex.assert_equal_shape_suffix(xs, 3)
        for x, y in zip(xs, ys):
            chex.assert_equal_shape_prefix((x, y), 1)
        channels = self.train_x.shape[-1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean/std need {channels} entries, got {self.mean}, {self.std}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """`(H, W, C)` of one image."""
        return tuple(self.train_x.shape[1:])


# ---------------------------------------------------------------------------------------
# Loading


def load_dataset(name: str, data_dir: str | None = None, *, seed: int = 0) -> Dataset:
    """Load data set `name` (one of `DATASETS`) from `data_dir` (default per name).

    Splits (train/val/test): digits 1257/270/270 (stratified); fashion_mnist 55k/5k/10k;
    cifar10/cifar100 45k/5k/10k; tiny-imagenet 90k/10k/10k (official val as test).
    For smaller files the validation split is `n_train // 12` (fashion_mnist) or
    `n_train // 10` (cifar, tiny-imagenet), which gives the sizes above on full data.
    `seed` does not change the split: splits are fixed so that runs with different
    seeds are compared on the same validation images.

    Raises:
      ValueError: unknown `name`.
      DataError: the files are missing or malformed (message says what to put where).
    """
    del seed  # Splits are deliberately seed-independent (see module docstring).
    if name not in _DEFAULT_DIRS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if data_dir is None:
        data_dir = _DEFAULT_DIRS[name]
    if name == "digits":
        return _load_digits()
    if name == "fashion_mnist":
        return _load_fashion_mnist(data_dir)
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, data_dir)
    return _load_tiny_imagenet(data_dir)


def train_subset(ds: Dataset, n: int | None) -> Dataset:
    """``ds`` training on a fixed stratified subset of ``n`` of its training images (None,
    or ``n`` at least the split's size: ``ds`` itself); validation and test splits are
    unchanged. Each class keeps its share (largest remainders get the leftover images),
    chosen by a fixed permutation: the same images for every seed and every run, so runs
    compare on the same data. Mean and std are those of the subset."""
    total = len(ds.train_y)
    if n is None or n >= total:
        return ds
    if n < 1:
        raise ValueError(f"--train_subset must be >= 1 image, got {n}")
    classes, counts = np.unique(ds.train_y, return_counts=True)
    share = counts * n / total
    take = np.floor(share).astype(int)
    for i in np.argsort(-(share - take), kind="stable")[: n - int(take.sum())]:
        take[i] += 1
    perm = np.random.default_rng(_SPLIT_SEED + 1).permutation(total)
    keep = np.concatenate([perm[ds.train_y[perm] == c][:k] for c, k in zip(classes, take)])
    keep = np.sort(keep)
    return _make_dataset(f"{ds.name}[{n}]", ds.train_x[keep], ds.train_y[keep], ds.val_x,
                         ds.val_y, ds.test_x, ds.test_y, num_classes=ds.num_classes,
                         flip=ds.flip)


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits  # start-up: sklearn takes 0.5 s; digits only
    from sklearn.model_selection import train_test_split  # start-up: as above

    digits = load_digits()
    # 0..16 -> 0..255, then bilinear 8x8 -> 32x32 so the CIFAR-sized nets apply unchanged.
    images = _upsample_bilinear(digits.images * (255.0 / 16.0), 32)
    images = np.clip(np.rint(images), 0, 255).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    idx = np.arange(len(labels))
    train_idx, rest_idx = train_test_split(
        idx, test_size=0.3, stratify=labels, random_state=_SPLIT_SEED)
    val_idx, test_idx = train_test_split(
        rest_idx, test_size=0.5, stratify=labels[rest_idx], random_state=_SPLIT_SEED)
    return _make_dataset(
        "digits", images[train_idx], labels[train_idx], images[val_idx], labels[val_idx],
        images[test_idx], labels[test_idx], num_classes=10, flip=False)


def _upsample_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """`[N, h, w]` float -> `[N, size, size]` float, bilinear with half-pixel centres."""
    n, h, w = images.shape
    return np.einsum("ih,nhw,jw->nij", _interp_matrix(h, size), images,
                     _interp_matrix(w, size))


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """`[n_out, n_in]` linear interpolation weights (rows sum to 1, edges clamped)."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(weights, (np.arange(n_out), hi), frac)
    return weights


def _load_fashion_mnist(data_dir: str) -> Dataset:
    paths = {}
    for gz_name in _FASHION_FILES:
        candidates = [os.path.join(data_dir, gz_name), os.path.join(data_dir, gz_name[:-3])]
        paths[gz_name] = next((p for p in candidates if os.path.isfile(p)), None)
    missing = [f for f, p in paths.items() if p is None]
    if missing:
        if os.path.isdir(os.path.join(data_dir, "fashion_mnist")):
            return _load_from_tfds("fashion_mnist", data_dir, num_classes=10, flip=False,
                                   val_divisor=12)
        what = ", ".join(_FASHION_FILES) if len(missing) == len(_FASHION_FILES) else (
            ", ".join(missing))
        raise DataError(
            f"Fashion-MNIST not found in {data_dir}: put {what} there "
            "(Debian: apt-get install dataset-fashion-mnist, or a TFDS data_dir with "
            "fashion_mnist/ prepared as array_record), or use --dataset digits")
    train_x = _read_idx(paths[_FASHION_FILES[0]], ndim=3)
    train_y = _read_idx(paths[_FASHION_FILES[1]], ndim=1)
    test_x = _read_idx(paths[_FASHION_FILES[2]], ndim=3)
    test_y = _read_idx(paths[_FASHION_FILES[3]], ndim=1)
    for x, x_path, y, y_path in ((train_x, paths[_FASHION_FILES[0]], train_y,
                                  paths[_FASHION_FILES[1]]),
                                 (test_x, paths[_FASHION_FILES[2]], test_y,
                                  paths[_FASHION_FILES[3]])):
        if x.shape[1:] != (28, 28):
            raise DataError(f"{x_path}: expected 28x28 images, got {x.shape[1:]}")
        if len(x) != len(y):
            raise DataError(f"{y_path}: {len(y)} labels for {len(x)} images in {x_path}")
        _check_labels(y, 10, y_path)
    return _split_and_make("fashion_mnist", train_x[..., None], train_y.astype(np.int32),
                           test_x[..., None], test_y.astype(np.int32), num_classes=10,
                           flip=False, val_divisor=12)


def _read_idx(path: str, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip-compressed if its name ends in .gz)."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is truncated or corrupt ({e}); download it again") from e
    # Header: two zero bytes, type 0x08 (ubyte), rank, then rank big-endian int32 sizes.
    if len(raw) < 4 + 4 * ndim or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise DataError(f"{path} is not an IDX file of rank-{ndim} unsigned bytes")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise DataError(f"{path} holds {data.size} bytes of data, header says {shape}: "
                        "truncated or corrupt, download it again")
    return data.reshape(shape)


def _load_cifar(name: str, data_dir: str) -> Dataset:
    is10 = name == "cifar10"
    folder = "cifar-10-batches-py" if is10 else "cifar-100-python"
    tarball = "cifar-10-python.tar.gz" if is10 else "cifar-100-python.tar.gz"
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if is10 else ["train"]
    test_file = "test_batch" if is10 else "test"
    label_key = b"labels" if is10 else b"fine_labels"
    num_classes = 10 if is10 else 100

    read = _cifar_reader(data_dir, folder, tarball, train_files + [test_file])
    if read is None:
        if os.path.isdir(os.path.join(data_dir, name)):
            return _load_from_tfds(name, data_dir, num_classes=num_classes, flip=True,
                                   val_divisor=10)
        pretty = "CIFAR-10" if is10 else "CIFAR-100"
        files = "data_batch_1..5, test_batch" if is10 else "train, test"
        raise DataError(
            f"{pretty} not found in {data_dir}: put the extracted python archive {folder}/ "
            f"({files}) or {tarball} there (https://www.cs.toronto.edu/~kriz/cifar.html), "
            f"or point --data at a TFDS data_dir with {name}/ prepared as array_record, "
            "or use --dataset digits")
    parts = [_read_cifar_batch(read, f, label_key, num_classes) for f in train_files]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = _read_cifar_batch(read, test_file, label_key, num_classes)
    return _split_and_make(name, train_x, train_y, test_x, test_y, num_classes=num_classes,
                           flip=True, val_divisor=10)


def _cifar_reader(data_dir: str, folder: str, tarball: str,
                  files: list[str]) -> Callable[[str], tuple[bytes, str]] | None:
    """A function `file -> (bytes, path for messages)`, or None if the archive is absent."""
    for root in (os.path.join(data_dir, folder), data_dir):
        if all(os.path.isfile(os.path.join(root, f)) for f in files):
            def read_file(f, root=root):
                path = os.path.join(root, f)
                with open(path, "rb") as fh:
                    return fh.read(), path
            return read_file
    tar_path = os.path.join(data_dir, tarball)
    if os.path.isfile(tar_path):
        contents = _read_tar_members(tar_path, [f"{folder}/{f}" for f in files])
        return lambda f: (contents[f"{folder}/{f}"], f"{tar_path}:{folder}/{f}")
    return None


def _read_tar_members(tar_path: str, names: list[str]) -> dict[str, bytes]:
    """Read `names` from a (compressed) tarball in one pass over it."""
    contents = {}
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            for member in tar:
                if member.name in names and member.isfile():
                    contents[member.name] = tar.extractfile(member).read()
    except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
        raise DataError(f"{tar_path} is truncated or corrupt ({e}); download it again") from e
    missing = [n for n in names if n not in contents]
    if missing:
        raise DataError(f"{tar_path} lacks {', '.join(missing)}; download it again")
    return contents


def _read_cifar_batch(read, file: str, label_key: bytes,
                      num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    raw, path = read(file)
    try:
        # The official archives are pickles; only load files you downloaded yourself.
        batch = pickle.loads(raw, encoding="bytes")
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[label_key])
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataError(f"{path} is not a CIFAR python batch with b'data' and {label_key!r} "
                        f"({type(e).__name__}: {e}); download it again") from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: expected b'data' of uint8 [N, 3072], got {data.dtype} "
                        f"{data.shape}")
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {labels.shape} labels for {len(data)} images")
    _check_labels(labels, num_classes, path)
    # Rows are channel-major (1024 R, 1024 G, 1024 B), each channel row-major.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def _load_from_tfds(name: str, data_dir: str, *, num_classes: int, flip: bool,
                    val_divisor: int) -> Dataset:
    """Read a TFDS data_dir prepared as array_record (random access, no TensorFlow)."""
    import tensorflow_datasets as tfds  # start-up: 275 modules; TFDS data sets only

    splits = {}
    for split in ("train", "test"):
        try:
            source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
            examples = [source[i] for i in range(len(source))]
        except Exception as e:  # noqa: BLE001 - TFDS raises many types for a bad dir
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(
                f"TFDS {name} in {data_dir} could not be read ({reason}): prepare it with "
                "file_format='array_record', or put the original files there, or use "
                "--dataset digits") from e
        where = f"TFDS {name}/{split} in {data_dir}"
        if not examples:
            raise DataError(f"{where} is empty; prepare it again")
        images = np.stack([np.asarray(ex["image"]) for ex in examples])
        labels = np.asarray([int(ex["label"]) for ex in examples])
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(f"{where}: expected uint8 images [N, H, W, C], got "
                            f"{images.dtype} {images.shape}")
        _check_labels(labels, num_classes, where)
        splits[split] = (images, labels.astype(np.int32))
    return _split_and_make(name, *splits["train"], *splits["test"],
                           num_classes=num_classes, flip=flip, val_divisor=val_divisor)


def _load_tiny_imagenet(data_dir: str) -> Dataset:
    root = data_dir
    if os.path.basename(os.path.normpath(data_dir)) != "tiny-imagenet-200":
        root = os.path.join(data_dir, "tiny-imagenet-200")
    train_dir = os.path.join(root, "train")
    annotations = os.path.join(root, "val", "val_annotations.txt")
    if not (os.path.isdir(train_dir) and os.path.isfile(annotations)):
        raise DataError(
            f"Tiny ImageNet not found in {data_dir}: put the extracted tiny-imagenet-200/ "
            "(train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt) "
            "there (http://cs231n.stanford.edu/tiny-imagenet-200.zip), or use --dataset "
            "digits")
    wnids_path = os.path.join(root, "wnids.txt")
    if os.path.isfile(wnids_path):
        with open(wnids_path) as f:
            wnids = sorted(line.strip() for line in f if line.strip())
    else:
        wnids = sorted(d for d in os.listdir(train_dir)
                       if os.path.isdir(os.path.join(train_dir, d)))
    class_of = {w: i for i, w in enumerate(wnids)}

    train_files, train_labels = [], []
    for wnid in wnids:
        image_dir = os.path.join(train_dir, wnid, "images")
        if not os.path.isdir(image_dir):
            raise DataError(f"{image_dir} is missing; extract tiny-imagenet-200 again")
        names = sorted(n for n in os.listdir(image_dir) if n.lower().endswith(".jpeg"))
        train_files += [os.path.join(image_dir, n) for n in names]
        train_labels += [class_of[wnid]] * len(names)

    test_files, test_labels = [], []
    with open(annotations) as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split("\t")
            if len(fields) < 2:
                continue
            if fields[1] not in class_of:
                raise DataError(f"{annotations}:{line_no}: unknown class {fields[1]!r}")
            test_files.append(os.path.join(root, "val", "images", fields[0]))
            test_labels.append(class_of[fields[1]])

    train_x = _read_jpegs(train_files, (64, 64, 3))
    test_x = _read_jpegs(test_files, (64, 64, 3))
    return _split_and_make("tiny-imagenet", train_x, np.asarray(train_labels, np.int32),
                           test_x, np.asarray(test_labels, np.int32),
                           num_classes=len(wnids), flip=True, val_divisor=10)


def _read_jpegs(paths: list[str], shape: tuple[int, int, int]) -> np.ndarray:
    out = np.empty((len(paths), *shape), np.uint8)

    def read_one(i):
        try:
            with Image.open(paths[i]) as im:
                image = np.asarray(im.convert("RGB"))  # A few are stored as grayscale.
        except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
            raise DataError(f"{paths[i]} cannot be read ({e}); extract it again") from e
        if image.shape != shape:
            raise DataError(f"{paths[i]}: expected a {shape} image, got {image.shape}")
        out[i] = image

    # PIL releases the GIL while decoding, so threads decode in parallel.
    with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(read_one, range(len(paths))))
    return out


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{where}: labels must lie in [0, {num_classes}), found "
                        f"{int(labels.min())}..{int(labels.max())}; the file is corrupt "
                        "or belongs to another data set")


def _split_and_make(name, train_x, train_y, test_x, test_y, *, num_classes, flip,
                    val_divisor) -> Dataset:
    """Hold out `len(train) // val_divisor` training images, chosen by a fixed permutation."""
    n_val = len(train_x) // val_divisor
    perm = np.random.default_rng(_SPLIT_SEED).permutation(len(train_x))
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return _make_dataset(name, train_x[train_idx], train_y[train_idx], train_x[val_idx],
                         train_y[val_idx], test_x, test_y, num_classes=num_classes,
                         flip=flip)


def _make_dataset(name, train_x, train_y, val_x, val_y, test_x, test_y, *, num_classes,
                  flip) -> Dataset:
    arrays = [np.ascontiguousarray(a) for a in (train_x, train_y, val_x, val_y, test_x,
                                                 test_y)]
    for a in arrays:
        a.setflags(write=False)  # Shared by every round of a run; nobody should edit it.
    mean, std = _channel_stats(arrays[0])
    return Dataset(name, *arrays, num_classes=num_classes, mean=mean, std=std, flip=flip)


def _channel_stats(images: np.ndarray, chunk: int = 8192) -> tuple[tuple, tuple]:
    """Per-channel mean and std of uint8 `[N, H, W, C]` images on the 0..1 scale."""
    total = np.zeros(images.shape[-1])
    total_sq = np.zeros(images.shape[-1])
    for start in range(0, len(images), chunk):  # Chunked: tiny-imagenet is 1.1e9 values.
        block = images[start:start + chunk].astype(np.float64) / 255.0
        total += block.sum(axis=(0, 1, 2))
        total_sq += np.square(block).sum(axis=(0, 1, 2))
    count = max(1, math.prod(images.shape[:-1]))
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std = np.where(std > 0, std, 1.0)  # A constant channel must not divide by zero.
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# ---------------------------------------------------------------------------------------
# On device, inside jit


def to_device(ds: Dataset) -> dict[str, jax.Array]:
    """The six splits as arrays on the default device (uint8 images, int32 labels)."""
    names = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
    return {k: jax.device_put(getattr(ds, k)) for k in names}


def normalize(images_uint8: jax.Array, mean, std) -> jax.Array:
    """uint8 `[..., C]` -> float32 `(x / 255 - mean) / std`, per channel."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (images_uint8.astype(jnp.float32) / 255.0 - mean) / std


def augment(key: jax.Array, images_uint8: jax.Array, *, flip: bool,
            pad: int = 4) -> jax.Array:
    """Random crop after `pad`-pixel zero padding, and random horizontal flip if `flip`.

    `images_uint8`: `[N, H, W, C]`; returns the same shape and dtype. Each image gets
    its own offset (uniform in `[0, 2 * pad]` per axis) and flip (probability 1/2).
    `flip` and `pad` are static.
    """
    n, h, w, c = images_uint8.shape
    key_crop, key_flip = jax.random.split(key)
    out = images_uint8
    if pad > 0:
        padded = jnp.pad(images_uint8, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        offsets = jax.random.randint(key_crop, (n, 2), 0, 2 * pad + 1)

        def crop(image, off):
            return jax.lax.dynamic_slice(image, (off[0], off[1], 0), (h, w, c))

        out = jax.vmap(crop)(padded, offsets)
    if flip:
        flipped = jax.random.bernoulli(key_flip, 0.5, (n,))
        out = jnp.where(flipped[:, None, None, None], out[:, :, ::-1, :], out)
    return out
