"""Networks: registry, parameter counts and paths from the architecture tables, forward passes.

The expected counts and shapes are derived here from the published architecture tables
with plain arithmetic, not from the modules, and cross-checked against published totals.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from rsst_jax import nets
from rsst_jax.nets import available_nets, get_net
from rsst_jax.nets.layers import KAIMING_NORMAL, conv
from rsst_jax.nets.resnet_cifar import BasicBlock

# ---------------------------------------------------------------- architecture tables
CIFAR_DEPTHS = {"res20s": 20, "res32s": 32, "res44s": 44, "res56s": 56, "res110s": 110}
CIFAR_WIDTHS = (16, 32, 64)
RESNET_BLOCKS = {"res18": ("basic", (2, 2, 2, 2)), "res50": ("bottleneck", (3, 4, 6, 3))}
RESNET_WIDTHS = (64, 128, 256, 512)
VGG_TABLE = {  # Simonyan & Zisserman table 1, columns A, B, D, E
    "vgg11_bn": "64 M 128 M 256 256 M 512 512 M 512 512 M",
    "vgg13_bn": "64 64 M 128 128 M 256 256 M 512 512 M 512 512 M",
    "vgg16_bn": "64 64 M 128 128 M 256 256 256 M 512 512 512 M 512 512 512 M",
    "vgg19_bn": "64 64 M 128 128 M 256 256 256 256 M 512 512 512 512 M 512 512 512 512 M",
}
MOBILENET_BLOCKS = [64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
MOBILENET_STRIDES = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]

# Totals printed by the reference PyTorch code (10 classes, RGB): akamaster/pytorch_resnet_cifar10
# (He et al. 2016, table 6) and kuangliu/pytorch-cifar.
PUBLISHED = {"res20s": 269_722, "res32s": 464_154, "res44s": 658_586, "res56s": 853_018,
             "res110s": 1_727_962, "res18": 11_173_962, "res50": 23_520_842,
             "mobilenet": 3_217_226}
ALL_NETS = sorted([*CIFAR_DEPTHS, *RESNET_BLOCKS, *VGG_TABLE, "mobilenet"])
SMALL_NETS = {"res20s", "res32s", "vgg11_bn"}


def vgg_convs(name):
    return [int(t) for t in VGG_TABLE[name].split() if t != "M"]


# ---------------------------------------------------------------- counts by arithmetic
def conv_bn(k, cin, cout, groups=1):
    """k x k bias-free conv kernel plus BN scale and bias."""
    return k * k * (cin // groups) * cout + 2 * cout


def linear(cin, cout):
    return cin * cout + cout


def expected_count(name, num_classes=10, in_ch=3, shortcut="A"):
    if name in CIFAR_DEPTHS:
        n = (CIFAR_DEPTHS[name] - 2) // 6
        total, cin = conv_bn(3, in_ch, 16), 16
        for w in CIFAR_WIDTHS:
            for _ in range(n):
                total += conv_bn(3, cin, w) + conv_bn(3, w, w)
                if cin != w and shortcut == "B":
                    total += conv_bn(1, cin, w)
                cin = w
        return total + linear(64, num_classes)
    if name in RESNET_BLOCKS:
        kind, blocks = RESNET_BLOCKS[name]
        total, cin = conv_bn(3, in_ch, 64), 64
        for s, (w, n) in enumerate(zip(RESNET_WIDTHS, blocks)):
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                if kind == "basic":
                    cout = w
                    total += conv_bn(3, cin, w) + conv_bn(3, w, w)
                else:
                    cout = 4 * w
                    total += conv_bn(1, cin, w) + conv_bn(3, w, w) + conv_bn(1, w, cout)
                if stride != 1 or cin != cout:
                    total += conv_bn(1, cin, cout)
                cin = cout
        return total + linear(cin, num_classes)
    if name in VGG_TABLE:
        total, cin = 0, in_ch
        for w in vgg_convs(name):
            total, cin = total + conv_bn(3, cin, w), w
        return total + linear(512, num_classes)
    if name == "mobilenet":
        total, cin = conv_bn(3, in_ch, 32), 32
        for w in MOBILENET_BLOCKS:
            total += conv_bn(3, cin, cin, groups=cin) + conv_bn(1, cin, w)
            cin = w
        return total + linear(1024, num_classes)
    raise KeyError(name)


# ---------------------------------------------------------------- paths and shapes
def expected_shapes(name, num_classes=10, in_ch=3, shortcut="A"):
    """{'path/to/leaf': shape}, convs inserted in the order the forward pass applies them."""
    shapes = {}

    def add(conv_path, bn_path, k, cin, cout, groups=1):
        shapes[f"{conv_path}/kernel"] = (k, k, cin // groups, cout)
        shapes[f"{bn_path}/scale"] = shapes[f"{bn_path}/bias"] = (cout,)

    def add_fc(path, cin):
        shapes[f"{path}/kernel"], shapes[f"{path}/bias"] = (cin, num_classes), (num_classes,)

    if name in CIFAR_DEPTHS or name in RESNET_BLOCKS:
        if name in CIFAR_DEPTHS:
            n = (CIFAR_DEPTHS[name] - 2) // 6
            kind, blocks, widths, short = "basic", (n, n, n), CIFAR_WIDTHS, shortcut
        else:
            (kind, blocks), widths, short = RESNET_BLOCKS[name], RESNET_WIDTHS, "B"
        cin = widths[0]
        add("conv1", "bn1", 3, in_ch, cin)
        for s, (w, n) in enumerate(zip(widths, blocks), start=1):
            for b in range(n):
                p = f"layer{s}_{b}"
                if kind == "basic":
                    cout = w
                    add(f"{p}/conv1", f"{p}/bn1", 3, cin, w)
                    add(f"{p}/conv2", f"{p}/bn2", 3, w, w)
                else:
                    cout = 4 * w
                    add(f"{p}/conv1", f"{p}/bn1", 1, cin, w)
                    add(f"{p}/conv2", f"{p}/bn2", 3, w, w)
                    add(f"{p}/conv3", f"{p}/bn3", 1, w, cout)
                if cin != cout and short == "B":
                    add(f"{p}/shortcut_conv", f"{p}/shortcut_bn", 1, cin, cout)
                cin = cout
        add_fc("fc", cin)
    elif name in VGG_TABLE:
        cin = in_ch
        for i, w in enumerate(vgg_convs(name)):
            add(f"features_conv{i}", f"features_bn{i}", 3, cin, w)
            cin = w
        add_fc("classifier", cin)
    else:
        add("conv1", "bn1", 3, in_ch, 32)
        cin = 32
        for i, w in enumerate(MOBILENET_BLOCKS):
            add(f"block{i}/conv_dw", f"block{i}/bn_dw", 3, cin, cin, groups=cin)
            add(f"block{i}/conv_pw", f"block{i}/bn_pw", 1, cin, w)
            cin = w
        add_fc("fc", cin)
    return shapes


def expected_conv_order(name, **kwargs):
    fc = {"classifier/kernel", "fc/kernel"}
    return [p[: -len("/kernel")] for p, s in expected_shapes(name, **kwargs).items()
            if p.endswith("/kernel") and p not in fc]


@functools.lru_cache(maxsize=None)
def abstract_init(name, num_classes=10, in_ch=3, shortcut=None):
    """(flat {path: ShapeDtypeStruct} of params, flat batch_stats, conv paths in call order)."""
    kwargs = {} if shortcut is None else {"shortcut": shortcut}
    model = get_net(name, num_classes, **kwargs)
    order = []

    def record(next_fun, args, kw, context):
        if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
            order.append("/".join(context.module.path))
        return next_fun(*args, **kw)

    with nn.intercept_methods(record):
        variables = jax.eval_shape(functools.partial(model.init, train=False),
                                   jax.random.key(0), jnp.zeros((1, 32, 32, in_ch)))
    return (flatten_dict(variables["params"], sep="/"),
            flatten_dict(variables["batch_stats"], sep="/"), order)


def numpy_init(abstract_variables, seed=0):
    """Concrete variables with the modules' initial distributions (Kaiming-normal kernels,
    BN 1/0, zero biases, running stats 0/1), drawn by numpy: an eager `model.init` compiles
    one RNG kernel per parameter shape, about 10 s for res50 on a CPU. `model.init` itself
    is traced for every net above and run in the initialization tests below."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * std)
        return jnp.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract_variables)


def n_params(flat):
    return sum(int(np.prod(leaf.shape)) for leaf in flat.values())


# ---------------------------------------------------------------- registry
def _package_nets():
    """Registered names whose factory lives in rsst_jax (other tests register their own)."""
    return [n for n in available_nets()
            if getattr(nets._REGISTRY[n], "func", nets._REGISTRY[n]).__module__.startswith("rsst_jax.")]


def test_registry_holds_every_family():
    assert _package_nets() == ALL_NETS


def test_unknown_arch_lists_choices():
    with pytest.raises(ValueError, match="unknown arch 'nope'; choose one of: ") as err:
        get_net("nope", 10)
    assert str(err.value).split("choose one of: ")[1].split(", ") == available_nets()
    assert set(ALL_NETS) <= set(available_nets())


def test_register_net_adds_a_factory(monkeypatch):
    monkeypatch.setattr(nets.registry, "_REGISTRY", dict(nets._REGISTRY))

    @nets.register_net("tiny")
    def tiny(num_classes, width=3):
        return nn.Dense(num_classes * width)

    assert "tiny" in available_nets()
    assert get_net("tiny", 4, width=2).features == 8
    with pytest.raises(ValueError, match="already registered"):
        nets.register_net("tiny")(tiny)


def test_bad_shortcut_is_rejected():
    with pytest.raises(ValueError, match="shortcut"):
        get_net("res20s", 10, shortcut="C")


# ---------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name", ALL_NETS)
@pytest.mark.parametrize("num_classes,in_ch", [(10, 3), (100, 1)])
def test_param_count_matches_architecture_table(name, num_classes, in_ch):
    params, _, _ = abstract_init(name, num_classes, in_ch)
    assert n_params(params) == expected_count(name, num_classes, in_ch)
    assert all(leaf.dtype == jnp.float32 for leaf in params.values())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_count_matches_published_total(name):
    assert expected_count(name) == PUBLISHED[name]
    assert n_params(abstract_init(name)[0]) == PUBLISHED[name]


def test_res20s_and_res56s_literal_counts():
    assert n_params(abstract_init("res20s")[0]) == 269722
    assert n_params(abstract_init("res56s")[0]) == 853018


@pytest.mark.parametrize("name", sorted(CIFAR_DEPTHS))
def test_shortcut_b_adds_exactly_two_projections(name):
    a, _, _ = abstract_init(name, shortcut="A")
    b, _, _ = abstract_init(name, shortcut="B")
    # 16->32 and 32->64 projections: 1x1 kernel plus BN scale and bias.
    assert n_params(b) - n_params(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64) == 2752
    assert n_params(b) == expected_count(name, shortcut="B")
    added = {p: leaf.shape for p, leaf in b.items() if p not in a}
    assert added == {
        "layer2_0/shortcut_conv/kernel": (1, 1, 16, 32),
        "layer2_0/shortcut_bn/scale": (32,), "layer2_0/shortcut_bn/bias": (32,),
        "layer3_0/shortcut_conv/kernel": (1, 1, 32, 64),
        "layer3_0/shortcut_bn/scale": (64,), "layer3_0/shortcut_bn/bias": (64,),
    }
    assert set(a) <= set(b)


# ---------------------------------------------------------------- paths
@pytest.mark.parametrize("name", ALL_NETS)
def test_param_paths_and_shapes(name):
    params, stats, order = abstract_init(name)
    assert {p: leaf.shape for p, leaf in params.items()} == expected_shapes(name)
    # the first conv applied to the image is `conv1` (`features_conv0` for VGG), and so on
    assert order == expected_conv_order(name)
    # running statistics exist for every BN layer and nothing else
    bn_paths = {p.rsplit("/", 1)[0] for p in params if p.endswith("/scale")}
    assert set(stats) == {f"{p}/{s}" for p in bn_paths for s in ("mean", "var")}


def test_res20s_with_shortcut_b_applies_projection_after_residual_convs():
    _, _, order = abstract_init("res20s", shortcut="B")
    assert order == expected_conv_order("res20s", shortcut="B")
    assert order.index("layer2_0/shortcut_conv") == order.index("layer2_0/conv2") + 1


# ---------------------------------------------------------------- forward passes
@pytest.mark.parametrize("name", ALL_NETS)
@pytest.mark.parametrize("shape,num_classes", [((2, 32, 32, 3), 10), ((2, 28, 28, 1), 100)])
def test_forward_train_and_eval(name, shape, num_classes):
    model = get_net(name, num_classes)
    x = jax.random.normal(jax.random.key(1), shape)
    variables = numpy_init(jax.eval_shape(functools.partial(model.init, train=False),
                                          jax.random.key(0), x))
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (2, num_classes) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    # training moves every running mean off its initial zero
    assert all(np.any(np.asarray(m) != 0)
               for p, m in flatten_dict(updates["batch_stats"], sep="/").items()
               if p.endswith("mean"))
    logits_eval = model.apply(variables, x, train=False)
    assert logits_eval.shape == (2, num_classes) and logits_eval.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits_eval)).all()
    # running statistics (0, 1) differ from the batch's, so the two modes disagree
    assert not np.allclose(np.asarray(logits), np.asarray(logits_eval))


def test_eval_mode_treats_samples_independently():
    model = get_net("res20s", 10)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    y = model.apply(variables, x, train=False)
    y_other = model.apply(variables, x.at[1].set(-x[1]), train=False)
    np.testing.assert_allclose(y[0], y_other[0], rtol=1e-6, atol=1e-6)
    y_train, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    y_train_other, _ = model.apply(variables, x.at[1].set(-x[1]), train=True,
                                   mutable=["batch_stats"])
    assert not np.allclose(y_train[0], y_train_other[0])


def test_batch_norm_updates_running_stats_with_pytorch_momentum():
    model = get_net("res20s", 10)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    h = jax.lax.conv_general_dilated(x, variables["params"]["conv1"]["kernel"], (1, 1),
                                     ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = np.asarray(h, np.float64)
    stats = updates["batch_stats"]["bn1"]
    # PyTorch momentum 0.1: running = 0.9 * running + 0.1 * batch (from mean 0, var 1)
    np.testing.assert_allclose(stats["mean"], 0.1 * h.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * h.var(axis=(0, 1, 2)), rtol=1e-4)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = get_net("res20s", 10, dtype=jnp.bfloat16)
    x = jnp.ones((2, 32, 32, 3))
    conv_dtypes = []

    def record(next_fun, args, kw, context):
        out = next_fun(*args, **kw)
        if isinstance(context.module, nn.Conv):
            conv_dtypes.append(out.dtype)
        return out

    variables = model.init(jax.random.key(0), x, train=False)
    with nn.intercept_methods(record):
        logits = model.apply(variables, x, train=False)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    assert logits.dtype == jnp.float32
    assert conv_dtypes and set(conv_dtypes) == {jnp.dtype(jnp.bfloat16)}


# ---------------------------------------------------------------- layers and initialization
def test_option_a_shortcut_subsamples_and_zero_pads():
    block = BasicBlock(32, strides=2, shortcut="A")
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 16))
    variables = block.init(jax.random.key(0), x, train=False)
    assert "shortcut_conv" not in variables["params"]
    # silence the residual branch: BN2 with zero scale and bias outputs 0
    params = dict(variables["params"])
    params["bn2"] = {"scale": jnp.zeros(32), "bias": jnp.zeros(32)}
    y = block.apply({**variables, "params": params}, x, train=False)
    expected = np.zeros((2, 4, 4, 32), np.float32)
    expected[..., 8:24] = np.maximum(np.asarray(x)[:, ::2, ::2, :], 0)
    np.testing.assert_array_equal(np.asarray(y), expected)


def test_strided_conv_pads_symmetrically_like_pytorch():
    layer = conv(1, 3, strides=2, name="c")
    x = np.arange(36, dtype=np.float32).reshape(1, 6, 6, 1)
    kernel = np.asarray(jax.random.normal(jax.random.key(3), (3, 3, 1, 1)))
    y = layer.apply({"params": {"kernel": jnp.asarray(kernel)}}, jnp.asarray(x))
    # torch.nn.Conv2d(1, 1, 3, stride=2, padding=1): one zero row/column on every side
    padded = np.pad(x[0, :, :, 0], 1)
    expected = np.array([[np.sum(padded[2 * i:2 * i + 3, 2 * j:2 * j + 3] * kernel[:, :, 0, 0])
                          for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(np.asarray(y)[0, :, :, 0], expected, rtol=1e-5)


def test_kaiming_normal_is_untruncated_with_fan_in_variance():
    w = np.asarray(KAIMING_NORMAL(jax.random.key(4), (3, 3, 128, 256), jnp.float32))
    std = np.sqrt(2.0 / (3 * 3 * 128))
    assert abs(w.std() / std - 1) < 0.01
    assert abs(w.mean()) < 0.01 * std
    assert np.abs(w).max() > 3.5 * std  # a truncated normal would stop at 2 std


def test_depthwise_kernel_fan_in_is_one_channel_times_taps():
    # torch: fan_in of a grouped conv is (in / groups) * kh * kw = 9 for a depthwise 3x3
    w = np.asarray(KAIMING_NORMAL(jax.random.key(5), (3, 3, 1, 4096), jnp.float32))
    assert abs(w.std() / np.sqrt(2.0 / 9) - 1) < 0.02


def test_initial_values_of_bn_and_classifier():
    model = get_net("res20s", 10)
    variables = model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)), train=False)
    params = flatten_dict(variables["params"], sep="/")
    for path, leaf in params.items():
        if path.endswith("/scale"):
            np.testing.assert_array_equal(leaf, 1.0)
        if path.endswith("/bias"):
            np.testing.assert_array_equal(leaf, 0.0)
    assert "conv1/bias" not in params
    fc = np.asarray(params["fc/kernel"])
    assert abs(fc.std() / np.sqrt(2.0 / 64) - 1) < 0.1  # Kaiming, not PyTorch's default uniform
