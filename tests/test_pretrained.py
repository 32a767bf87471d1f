"""PyTorch/torchvision state_dict -> rsst-jax layout (rsst_jax.pretrained), without torch.

The fake state_dicts below are built from torchvision's module names and shapes
(torchvision.models.resnet18/resnet50/vgg16_bn), filled with random numpy arrays.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsst_jax import checkpoint as ckpt
from rsst_jax import nets
from rsst_jax import pretrained as pt
from rsst_jax.nets.layers import batch_norm, conv, dense

RNG = np.random.default_rng(0)


def _bn(sd, name, c):
    sd[f"{name}.weight"] = RNG.normal(1.0, 0.1, c).astype(np.float32)
    sd[f"{name}.bias"] = RNG.normal(0.0, 0.1, c).astype(np.float32)
    sd[f"{name}.running_mean"] = RNG.normal(0.0, 0.1, c).astype(np.float32)
    sd[f"{name}.running_var"] = RNG.uniform(0.5, 1.5, c).astype(np.float32)
    sd[f"{name}.num_batches_tracked"] = np.array(100, np.int64)


def _conv(sd, name, o, i, k, bias=False):
    sd[f"{name}.weight"] = RNG.normal(0.0, 0.1, (o, i, k, k)).astype(np.float32)
    if bias:
        sd[f"{name}.bias"] = RNG.normal(0.0, 0.1, o).astype(np.float32)


def torchvision_resnet(depth: int, num_classes: int = 1000) -> dict:
    """torchvision.models.resnet{18,50}().state_dict() names and shapes."""
    blocks, bottleneck = {18: ((2, 2, 2, 2), False), 50: ((3, 4, 6, 3), True)}[depth]
    sd = {}
    _conv(sd, "conv1", 64, 3, 7)
    _bn(sd, "bn1", 64)
    inplanes = 64
    for s, (width, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for b in range(n):
            p = f"layer{s}.{b}"
            stride = 2 if s > 1 and b == 0 else 1
            out = width * (4 if bottleneck else 1)
            if bottleneck:
                _conv(sd, f"{p}.conv1", width, inplanes, 1)
                _bn(sd, f"{p}.bn1", width)
                _conv(sd, f"{p}.conv2", width, width, 3)
                _bn(sd, f"{p}.bn2", width)
                _conv(sd, f"{p}.conv3", out, width, 1)
                _bn(sd, f"{p}.bn3", out)
            else:
                _conv(sd, f"{p}.conv1", width, inplanes, 3)
                _bn(sd, f"{p}.bn1", width)
                _conv(sd, f"{p}.conv2", width, width, 3)
                _bn(sd, f"{p}.bn2", width)
            if stride != 1 or inplanes != out:
                _conv(sd, f"{p}.downsample.0", out, inplanes, 1)
                _bn(sd, f"{p}.downsample.1", out)
            inplanes = out
    sd["fc.weight"] = RNG.normal(0, 0.01, (num_classes, inplanes)).astype(np.float32)
    sd["fc.bias"] = RNG.normal(0, 0.01, num_classes).astype(np.float32)
    return sd


def torchvision_vgg16_bn(num_classes: int = 1000) -> dict:
    """torchvision.models.vgg16_bn().state_dict() names and shapes."""
    cfg = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
    sd, idx, cin = {}, 0, 3
    for item in cfg:
        if item == "M":
            idx += 1
            continue
        _conv(sd, f"features.{idx}", item, cin, 3, bias=True)
        _bn(sd, f"features.{idx + 1}", item)
        idx += 3  # conv, bn, relu
        cin = item
    for k, (o, i) in zip((0, 3, 6), ((4096, 512 * 7 * 7), (4096, 4096), (num_classes, 4096))):
        # zeros: 120M random numbers would dominate the test's time, and these are dropped
        sd[f"classifier.{k}.weight"] = np.zeros((o, i), np.float32)
        sd[f"classifier.{k}.bias"] = np.zeros(o, np.float32)
    return sd


FAKES = {"res18": lambda: torchvision_resnet(18), "res50": lambda: torchvision_resnet(50),
         "vgg16_bn": torchvision_vgg16_bn}


def _template(arch, num_classes=1000, channels=3):
    model = nets.get_net(arch, num_classes)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 32, 32, channels)), train=False))


def _flat(tree):
    from rsst_jax.masks import flat_dict
    return flat_dict(tree)


def test_fake_state_dicts_have_torchvisions_key_counts():
    # torchvision: len(resnet18().state_dict()) == 122, resnet50 320, vgg16_bn 97.
    assert [len(FAKES[a]()) for a in ("res18", "res50", "vgg16_bn")] == [122, 320, 97]


@pytest.mark.parametrize("arch", ["res18", "res50", "vgg16_bn"])
def test_every_leaf_lands_at_its_path_with_its_shape(arch):
    sd = FAKES[arch]()
    conversion = pt.convert_state_dict(sd)
    got = _flat(conversion.variables)
    want = _flat({"params": _template(arch)["params"], "batch_stats": _template(arch)["batch_stats"]})
    assert set(got) == set(want)
    # Only torchvision's ImageNet stem (7x7) and VGG's 25088-wide classifier differ from ours.
    expected_diff = {"res18": {"params/conv1/kernel": (7, 7, 3, 64)},
                     "res50": {"params/conv1/kernel": (7, 7, 3, 64)},
                     "vgg16_bn": {"params/classifier/kernel": (4096, 1000)}}[arch]
    for path, value in got.items():
        assert value.shape == expected_diff.get(path, want[path].shape), path
    # Every torch key is used exactly once or deliberately dropped.
    used = [k for s in conversion.sources.values() for k in s.split(" - ")]  # folded bias: 2 keys
    dropped = [k for k, _ in conversion.dropped]
    assert len(used) == len(set(used))
    assert sorted(used + dropped) == sorted(k for k in sd if not k.endswith("num_batches_tracked"))
    if arch == "vgg16_bn":
        assert sorted(dropped) == ["classifier.0.bias", "classifier.0.weight",
                                   "classifier.3.bias", "classifier.3.weight"]


def test_resnet_values_are_transposed_not_reordered():
    sd = torchvision_resnet(50)
    v = pt.convert_state_dict(sd).variables
    w = sd["layer2.0.conv2.weight"]                        # (O, I, kh, kw)
    k = v["params"]["layer2_0"]["conv2"]["kernel"]         # (kh, kw, I, O)
    assert k[1, 2, 5, 7] == w[7, 5, 1, 2]
    np.testing.assert_array_equal(v["params"]["layer3_0"]["shortcut_conv"]["kernel"][0, 0],
                                  sd["layer3.0.downsample.0.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(v["params"]["fc"]["kernel"], sd["fc.weight"].T)
    np.testing.assert_array_equal(v["params"]["fc"]["bias"], sd["fc.bias"])
    bn = "layer4.2.bn3"
    np.testing.assert_array_equal(v["params"]["layer4_2"]["bn3"]["scale"], sd[f"{bn}.weight"])
    np.testing.assert_array_equal(v["params"]["layer4_2"]["bn3"]["bias"], sd[f"{bn}.bias"])
    np.testing.assert_array_equal(v["batch_stats"]["layer4_2"]["bn3"]["mean"], sd[f"{bn}.running_mean"])
    np.testing.assert_array_equal(v["batch_stats"]["layer4_2"]["bn3"]["var"], sd[f"{bn}.running_var"])
    np.testing.assert_array_equal(v["batch_stats"]["layer1_0"]["shortcut_bn"]["var"],
                                  sd["layer1.0.downsample.1.running_var"])


def _torch_conv2d(x_nchw, w_oihw, stride, pad):
    """numpy reference of torch.nn.functional.conv2d (cross-correlation, zero padding)."""
    n, c, h, wd = x_nchw.shape
    o, _, kh, kw = w_oihw.shape
    xp = np.pad(x_nchw, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, o, oh, ow), np.float64)
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
            out[:, :, i, j] = np.einsum("nchw,ochw->no", patch, w_oihw)
    return out


@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (1, 2), (7, 2)])
def test_converted_conv_computes_the_torch_conv(k, stride):
    w = RNG.normal(size=(5, 3, k, k)).astype(np.float32)
    x = RNG.normal(size=(2, 3, 9, 9)).astype(np.float32)
    v = pt.convert_state_dict({"conv1.weight": w}).variables
    layer = conv(5, k, stride, name="conv1")
    y = layer.apply({"params": v["params"]["conv1"]}, jnp.asarray(x.transpose(0, 2, 3, 1)))
    ref = _torch_conv2d(x, w, stride, k // 2)
    np.testing.assert_allclose(np.asarray(y).transpose(0, 3, 1, 2), ref, rtol=1e-4, atol=1e-4)


def test_converted_linear_computes_the_torch_linear():
    w, b = RNG.normal(size=(7, 4)).astype(np.float32), RNG.normal(size=7).astype(np.float32)
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    v = pt.convert_state_dict({"fc.weight": w, "fc.bias": b}).variables
    y = dense(7, name="fc").apply({"params": v["params"]["fc"]}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), x @ w.T + b, rtol=1e-5, atol=1e-5)


def test_vgg_conv_bias_folds_exactly_into_batchnorm():
    sd = {}
    _conv(sd, "features.0", 4, 3, 3, bias=True)
    _bn(sd, "features.1", 4)
    v = pt.convert_state_dict(sd).variables
    x = RNG.normal(size=(2, 3, 5, 5)).astype(np.float32)
    # torch eval: BN(conv(x) + b) with running statistics
    z = _torch_conv2d(x, sd["features.0.weight"], 1, 1) + sd["features.0.bias"][None, :, None, None]
    g, beta = sd["features.1.weight"], sd["features.1.bias"]
    m, var = sd["features.1.running_mean"], sd["features.1.running_var"]
    ref = (z - m[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5) \
        * g[None, :, None, None] + beta[None, :, None, None]
    y = conv(4, 3, name="c").apply({"params": v["params"]["features_conv0"]},
                                   jnp.asarray(x.transpose(0, 2, 3, 1)))
    y = batch_norm(False, name="bn").apply({"params": v["params"]["features_bn0"],
                                           "batch_stats": v["batch_stats"]["features_bn0"]}, y)
    np.testing.assert_allclose(np.asarray(y).transpose(0, 3, 1, 2), ref, rtol=1e-4, atol=1e-4)


def test_pruned_reparametrization_and_dataparallel_prefix():
    w = RNG.normal(size=(4, 4, 3, 3)).astype(np.float32)
    mask = (RNG.uniform(size=w.shape) > 0.5).astype(np.float32)
    v = pt.convert_state_dict({"module.layer1.0.conv1.weight_orig": w,
                               "module.layer1.0.conv1.weight_mask": mask}).variables
    np.testing.assert_array_equal(v["params"]["layer1_0"]["conv1"]["kernel"],
                                  (w * mask).transpose(2, 3, 1, 0))


def test_unknown_names_and_plain_vgg_are_refused():
    with pytest.raises(pt.PretrainedError, match="no place"):
        pt.convert_state_dict({"encoder.blocks.0.attn.weight": np.zeros((4, 4), np.float32)})
    sd = {}
    _conv(sd, "features.0", 4, 3, 3, bias=True)
    _conv(sd, "features.2", 4, 4, 3, bias=True)
    with pytest.raises(pt.PretrainedError, match="no BatchNorm"):
        pt.convert_state_dict(sd)


def _zeros(arch, num_classes):
    """A template of zeros (cheaper than a real init for the 11M-parameter res18)."""
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), _template(arch, num_classes))


def _init(arch, num_classes, channels=3, seed=0):
    model = nets.get_net(arch, num_classes)
    return model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, channels)), train=False)


def test_load_npz_keeps_stem_and_classifier_fresh(tmp_path):
    sd = torchvision_resnet(18)
    path = tmp_path / "resnet18.npz"
    np.savez(path, **sd)
    template = _zeros("res18", 10)
    variables, report = pt.load_pretrained(path, template, with_report=True)
    conversion = pt.convert_state_dict(sd).variables
    np.testing.assert_array_equal(variables["params"]["conv1"]["kernel"],
                                  template["params"]["conv1"]["kernel"])
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], template["params"]["fc"]["kernel"])
    np.testing.assert_array_equal(variables["params"]["layer4_1"]["conv2"]["kernel"],
                                  conversion["params"]["layer4_1"]["conv2"]["kernel"])
    np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["var"], sd["bn1.running_var"])
    assert sorted(p for p, _ in report.fresh) == ["params/conv1/kernel", "params/fc/bias",
                                                   "params/fc/kernel"]
    assert len(report.loaded) == len(_flat(template)) - 3
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
        {"params": template["params"], "batch_stats": template["batch_stats"]})


def test_load_refuses_another_architecture(tmp_path):
    path = tmp_path / "resnet18.npz"
    np.savez(path, **torchvision_resnet(18))
    with pytest.raises(pt.PretrainedError, match="layer1_0/conv1/kernel"):
        pt.load_pretrained(path, _template("res50", 10))


def test_torch_file_without_torch_says_how_to_get_it(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    path.write_bytes(b"not really")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(pt.PretrainedError, match="pip install torch"):
        pt.load_pretrained(path, _template("res18", 10))


def test_load_rsst_checkpoint_and_replace_head(tmp_path):
    src = _init("res20s", 10, channels=1, seed=3)
    ckpt.save(tmp_path / "ckpt", 0, {"params": src["params"], "batch_stats": src["batch_stats"]},
              {"arch": "res20s"})
    same = pt.load_pretrained(tmp_path / "ckpt", _init("res20s", 10, channels=1))
    for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(src)):
        np.testing.assert_array_equal(a, b)
    other = _init("res20s", 100, channels=1)
    got, report = pt.load_pretrained(tmp_path / "ckpt" / "0", other, with_report=True)
    np.testing.assert_array_equal(got["params"]["fc"]["kernel"], other["params"]["fc"]["kernel"])
    np.testing.assert_array_equal(got["params"]["layer3_2"]["conv2"]["kernel"],
                                  src["params"]["layer3_2"]["conv2"]["kernel"])
    assert {p for p, _ in report.fresh} == {"params/fc/kernel", "params/fc/bias"}


def test_bad_paths_give_clear_errors(tmp_path):
    with pytest.raises(pt.PretrainedError, match="no such file"):
        pt.load_pretrained(tmp_path / "missing.pt", {"params": {}})
    (tmp_path / "w.h5").write_text("x")
    with pytest.raises(pt.PretrainedError, match="expected an rsst-jax checkpoint"):
        pt.load_pretrained(tmp_path / "w.h5", {"params": {}})
    (tmp_path / "empty").mkdir()
    with pytest.raises(pt.PretrainedError, match="neither an rsst-jax run"):
        pt.load_pretrained(tmp_path / "empty", {"params": {}})
