"""Compaction: BN masks, the compact network computes the masked one, exact sizes and FLOPs.

Expected parameter counts and MACs are computed here from the architecture tables with
plain arithmetic and an independent statement of which channels may go; logits are
compared on real (digits) images in eval mode.
"""
import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from rsst_jax import checkpoint as ckpt
from rsst_jax import counting, model_masks
from rsst_jax import data as data_lib
from rsst_jax import masks as masks_lib
from rsst_jax.compact import compact
from rsst_jax.nets import get_net

SHAPE = (32, 32, 1)  # digits
CIFAR_WIDTHS = (16, 32, 64)
VGG16 = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
MOBILENET = [64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]


# ---------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=None)
def images():
    ds = data_lib.load_dataset("digits")
    return jnp.asarray(data_lib.normalize(ds.test_x[:4], ds.mean, ds.std))


@functools.lru_cache(maxsize=None)
def net(name, **kwargs):
    return get_net(name, 10, **kwargs)


@functools.lru_cache(maxsize=None)
def forward(model):
    return jax.jit(lambda v, x: model.apply(v, x, train=False))


def trained_like(model, seed=0):
    """Variables with nontrivial BN statistics, scales and biases (numpy-drawn: no compiles)."""
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *SHAPE)),
                                                 train=False))
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in flatten_dict(abstract, sep="/").items():
        name = path.rsplit("/", 1)[-1]
        if name == "kernel":
            v = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        elif name in ("scale", "var"):
            v = rng.uniform(0.5, 1.5, leaf.shape)
        else:  # bias, mean
            v = rng.normal(0.0, 0.2, leaf.shape)
        out[tuple(path.split("/"))] = jnp.asarray(v, jnp.float32)
    return unflatten_dict(out)


def channel_masks(params, dead, conv1=False, unstructured=None, stem="conv1"):
    """Masks with output channels ``dead[module]`` of each module's kernel pruned, and with
    a fraction 0.2 of the other weights pruned given an ``unstructured`` numpy Generator.
    (The stem is named: ``eval_shape`` sorts dict keys, so "the first conv" is not it.)"""
    masks = masks_lib.init_masks(params, conv1=conv1, stem=stem)
    paths = masks_lib.tree_paths(masks)
    leaves = jax.tree_util.tree_leaves(masks, is_leaf=lambda x: x is None)
    new = []
    for path, m in zip(paths, leaves):
        if m is not None:
            m = np.array(m)
            m[..., list(dead.get(path[: -len("/kernel")], ()))] = False
            if unstructured is not None:
                m &= unstructured.random(m.shape) > 0.2
            m = jnp.asarray(m)
        new.append(m)
    treedef = jax.tree_util.tree_structure(masks, is_leaf=lambda x: x is None)
    return jax.tree_util.tree_unflatten(treedef, new)


def with_bn(model, params, masks, only=None):
    """``masks`` merged with the BN masks (of the convs in ``only``, default all)."""
    extra = model_masks.bn_masks(model, params, masks, SHAPE)
    if only is not None:
        bns = {bn for conv, bn in model_masks.conv_bn_pairs(model, SHAPE) if conv in only}
        extra = jax.tree_util.tree_map_with_path(
            lambda path, m: m if "/".join(k.key for k in path[:-1]) in bns else None,
            extra, is_leaf=lambda x: x is None)
    return model_masks.merge_masks(masks, extra)


def mask_items(masks):
    return dict(zip(masks_lib.tree_paths(masks),
                    jax.tree_util.tree_leaves(masks, is_leaf=lambda x: x is None)))


def check_compact(model, variables, masks, expected_params, **kwargs):
    """Compact, compare logits with the masked network, check the parameter count."""
    cmodel, cvars, desc = compact(model, variables, masks, sample_shape=SHAPE, **kwargs)
    x = images()
    ref = np.asarray(forward(model)(model_masks.masked_variables(variables, masks), x))
    got = np.asarray(forward(cmodel)(cvars, x))
    assert got.shape == ref.shape
    if desc["exact"]:
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert counting.count_params(cvars["params"]) == expected_params
    return cmodel, cvars, desc, got, ref


def conv_bn(k, cin, cout, groups=1):
    return k * k * (cin // groups) * cout + 2 * cout


def linear(cin, cout=10):
    return cin * cout + cout


def resnet_cifar_count(stem, blocks, shortcut="A", in_ch=1):
    """blocks: (conv1, conv2) widths in order, stages of three (res20s)."""
    total, cin = conv_bn(3, in_ch, stem), stem
    for i, (mid, out) in enumerate(blocks):
        total += conv_bn(3, cin, mid) + conv_bn(3, mid, out)
        if shortcut == "B" and i in (3, 6):
            total += conv_bn(1, cin, out)
        cin = out
    return total + linear(cin)


def vgg_count(widths, in_ch=1):
    total, cin = 0, in_ch
    for w in widths:
        total, cin = total + conv_bn(3, cin, w), w
    return total + linear(cin)


def mobilenet_count(stem, widths, in_ch=1):
    total, cin = conv_bn(3, in_ch, stem), stem
    for w in widths:
        total += conv_bn(3, cin, cin, groups=cin) + conv_bn(1, cin, w)
        cin = w
    return total + linear(cin)


RES20_BLOCKS = [f"layer{s}_{b}" for s in (1, 2, 3) for b in range(3)]


# ---------------------------------------------------------------- BN masks
def test_bn_masks_pair_convs_with_their_batchnorm_and_zero_the_dead_channel():
    model = net("res20s")
    variables = trained_like(model)
    params = variables["params"]
    masks = channel_masks(params, {"layer1_0/conv1": [2, 5], "layer3_2/conv2": [0]})
    extra = model_masks.bn_masks(model, params, masks, SHAPE)
    flat = {p: m for p, m in mask_items(extra).items() if m is not None}
    # every BN after a prunable conv, and nothing else (the stem conv1 is not prunable)
    expected = {f"{b}/{bn}/{leaf}" for b in RES20_BLOCKS for bn in ("bn1", "bn2")
                for leaf in ("scale", "bias")}
    assert set(flat) == expected
    assert np.flatnonzero(~np.asarray(flat["layer1_0/bn1/scale"])).tolist() == [2, 5]
    assert np.flatnonzero(~np.asarray(flat["layer3_2/bn2/bias"])).tolist() == [0]
    assert np.asarray(flat["layer1_1/bn1/scale"]).all()

    merged = model_masks.merge_masks(masks, extra)
    masks_lib.check_masks(params, merged)

    @functools.partial(jax.jit, static_argnums=2)
    def bn_outputs(variables, x, train):
        out = {}

        def record(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            if isinstance(context.module, nn.BatchNorm):
                out["/".join(context.module.path)] = y
            return y

        with nn.intercept_methods(record):
            model.apply(variables, x, train=train, mutable=["batch_stats"] if train else False)
        return out

    x = images()[:2]
    for train in (False, True):
        out = bn_outputs(model_masks.masked_variables(variables, merged), x, train)
        y = np.asarray(out["layer1_0/bn1"])
        assert np.all(y[..., [2, 5]] == 0.0)  # exactly zero after BatchNorm
        assert np.all(np.asarray(out["layer3_2/bn2"])[..., 0] == 0.0)
        assert np.any(y[..., 3] != 0.0)
    # without the BN masks the dead conv channel is a nonzero constant after BatchNorm
    out = bn_outputs(model_masks.masked_variables(variables, masks), x, False)
    assert np.all(np.asarray(out["layer1_0/bn1"])[..., 2] != 0.0)


def test_bn_masks_need_no_layer_names_and_keep_one_structure():
    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.Conv(4, (3, 3), use_bias=False, name="alpha")(x)
            x = nn.BatchNorm(use_running_average=not train, name="omega")(x)
            y = nn.Conv(3, (1, 1), use_bias=False, name="beta")(nn.relu(x))
            y = nn.relu(y)  # not directly followed by a BN: no pair
            return nn.BatchNorm(use_running_average=not train, name="gamma")(y)

    model = Odd()
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 2)), train=False)["params"]
    assert model_masks.conv_bn_pairs(model, (6, 6, 2)) == [("alpha", "omega")]
    masks = masks_lib.init_masks(params, conv1=True)
    one = model_masks.bn_masks(model, params, masks, (6, 6, 2))
    masks2 = jax.tree_util.tree_map(lambda m: None if m is None else m.at[..., 1].set(False),
                                    masks, is_leaf=lambda x: x is None)
    two = model_masks.bn_masks(model, params, masks2, (6, 6, 2))
    is_none = lambda x: x is None  # noqa: E731
    assert jax.tree_util.tree_structure(one, is_leaf=is_none) == \
        jax.tree_util.tree_structure(two, is_leaf=is_none)
    assert np.asarray(two["omega"]["scale"]).tolist() == [True, False, True, True]
    assert two["gamma"]["scale"] is None and two["alpha"]["kernel"] is None
    merged = model_masks.merge_masks(masks2, two)
    assert merged["alpha"]["kernel"] is masks2["alpha"]["kernel"]
    assert merged["omega"]["bias"] is two["omega"]["bias"]


# ---------------------------------------------------------------- res20s
def test_res20s_internal_channels():
    model = net("res20s")
    variables = trained_like(model)
    dead = {"layer1_0/conv1": [0, 3, 5], "layer2_1/conv1": range(1, 11),
            "layer3_2/conv1": range(62)}
    masks = with_bn(model, variables["params"], channel_masks(variables["params"], dead))
    blocks = [(13, 16), (16, 16), (16, 16), (32, 32), (22, 32), (32, 32),
              (64, 64), (64, 64), (2, 64)]
    _, _, desc, _, _ = check_compact(model, variables, masks, resnet_cifar_count(16, blocks))
    assert desc["exact"] and desc["pruned_channels_kept"] == 0
    assert desc["layers"]["layer1_0/conv1"]["kept"] == [1, 2, 4] + list(range(6, 16))
    assert desc["layers"]["layer1_0/conv2"]["in"] == 13


def test_res20s_option_a_stream_channels_go_only_when_dead_in_every_writer():
    """Option A pads stage s-1's channels into the middle of stage s: stage-2 channel 2 and
    stage-3 channel 18 are one stream channel, written by all six conv2s of stages 2-3."""
    model = net("res20s")
    variables = trained_like(model, seed=1)
    stage2 = [f"layer2_{b}/conv2" for b in range(3)]
    stage3 = [f"layer3_{b}/conv2" for b in range(3)]
    dead = {**{m: [2] for m in stage2}, **{m: [0, 18, 20, 63] for m in stage3},
            **{f"layer1_{b}/conv2": [1] for b in range(3)}}
    masks = with_bn(model, variables["params"], channel_masks(variables["params"], dead))
    # removed: stage 2 {2}; stage 3 {0, 63 (padding: stage-3 writers only), 18 (= stage-2 2)};
    # kept: stage-3 20 (its stage-2 channel 4 lives), stage-1 1 (the stem writes it)
    blocks = [(16, 16)] * 3 + [(32, 31)] * 3 + [(64, 61)] * 3
    cmodel, cvars, desc, _, _ = check_compact(model, variables, masks,
                                              resnet_cifar_count(16, blocks))
    assert desc["pruned_channels_kept"] == 6
    assert cmodel.shortcut_maps[3] == tuple([-1] * 7 + list(range(16)) + [-1] * 8)
    assert len(cmodel.shortcut_maps[6]) == 61

    # With a prunable stem, stage-1 channel 1 is also stage-2 channel 9 and stage-3 channel 25.
    masks = channel_masks(variables["params"], {
        "conv1": [1], **{f"layer1_{b}/conv2": [1] for b in range(3)},
        **{m: [9] for m in stage2}, **{m: [25] for m in stage3}}, conv1=True)
    masks = with_bn(model, variables["params"], masks)
    blocks = [(16, 15)] * 3 + [(32, 31)] * 3 + [(64, 63)] * 3
    check_compact(model, variables, masks, resnet_cifar_count(15, blocks))


def test_res20s_option_b_stream_includes_the_projection_shortcut():
    model = net("res20s", shortcut="B")
    variables = trained_like(model, seed=2)
    dead = {**{f"layer2_{b}/conv2": [3] for b in range(3)}, "layer2_0/shortcut_conv": [3],
            **{f"layer3_{b}/conv2": [5, 6] for b in range(3)}, "layer3_0/shortcut_conv": [5]}
    masks = with_bn(model, variables["params"], channel_masks(variables["params"], dead))
    blocks = [(16, 16)] * 3 + [(32, 31)] * 3 + [(64, 63)] * 3  # channel 6: shortcut lives
    _, _, desc, _, _ = check_compact(model, variables, masks,
                                     resnet_cifar_count(16, blocks, shortcut="B"))
    assert desc["pruned_channels_kept"] == 3


def res20s_reference_widths(dead, bn_zero):
    """(conv1, conv2) widths of res20s (option A) blocks after compaction, stated directly:
    a block-internal channel goes when it is dead with its BN zeroed; a stream channel is
    followed back through the shortcut's zero-padding to the stage where it starts (the
    stem writes every stage-1 channel) and goes when all its writers, in every stage it
    spans, are dead with zeroed BN."""
    def gone(module, c):
        return c in dead.get(module, ()) and module in bn_zero

    def origin(s, j):
        before, prev_width = {2: 8, 3: 16}, {2: 16, 3: 32}
        while s > 1 and 0 <= j - before[s] < prev_width[s]:
            s, j = s - 1, j - before[s]
        return s, j

    writers = {}
    for s, w in zip((1, 2, 3), CIFAR_WIDTHS):
        for j in range(w):
            dead_writers = [gone(f"layer{s}_{b}/conv2", j) for b in range(3)]
            writers.setdefault(origin(s, j), []).extend(dead_writers + [False] * (s == 1))
    blocks = []
    for s, w in zip((1, 2, 3), CIFAR_WIDTHS):
        out = sum(not all(writers[origin(s, j)]) for j in range(w))
        for b in range(3):
            blocks.append((sum(not gone(f"layer{s}_{b}/conv1", c) for c in range(w)), out))
    return blocks


def test_res20s_mixed_refill_like_masks_exact_and_approximate():
    model = net("res20s")
    variables = trained_like(model, seed=3)
    rng = np.random.default_rng(3)
    params = variables["params"]
    dead = {}
    for b in RES20_BLOCKS:
        for conv in ("conv1", "conv2"):
            c = np.shape(params[b][conv]["kernel"])[-1]
            dead[f"{b}/{conv}"] = sorted(rng.choice(c, size=c // 2, replace=False).tolist())
    # the stream: channels dead in all writers of stage 3 (padding range) and stage 2
    for b in range(3):
        dead[f"layer3_{b}/conv2"] = sorted(set(dead[f"layer3_{b}/conv2"]) | {0, 1, 62})
        dead[f"layer2_{b}/conv2"] = sorted(set(dead[f"layer2_{b}/conv2"]) | {0, 5})
        dead[f"layer3_{b}/conv2"] = sorted(set(dead[f"layer3_{b}/conv2"]) | {21})
    masks = channel_masks(params, dead, unstructured=rng)
    bn_zero = {f"{b}/conv2" for b in RES20_BLOCKS} | {f"{b}/conv1" for b in RES20_BLOCKS[::2]}
    merged = with_bn(model, params, masks, only=bn_zero)
    blocks = res20s_reference_widths(dead, bn_zero)
    assert blocks[6][1] <= 64 - 4  # the hand-made stream channels really go
    _, _, desc, _, _ = check_compact(model, variables, merged, resnet_cifar_count(16, blocks))
    assert desc["exact"]

    # approximate: dead channels whose BN still adds a constant go too, with an error
    all_bn = set(dead)
    blocks = res20s_reference_widths(dead, all_bn)
    _, _, desc, got, ref = check_compact(model, variables, merged,
                                         resnet_cifar_count(16, blocks), approximate=True)
    assert not desc["exact"] and desc["approximate_channels"] > 0
    assert not np.allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_res20s_fully_pruned_layer_keeps_one_channel_and_round_to_keeps_multiples():
    model = net("res20s")
    variables = trained_like(model, seed=8)
    dead = {"layer1_0/conv1": range(16), "layer2_1/conv1": range(30),
            **{f"layer3_{b}/conv2": [*range(18), 63] for b in range(3)}}
    masks = with_bn(model, variables["params"], channel_masks(variables["params"], dead))
    # a layer of width 0 cannot be built: one (zero) channel stays; stage-3 channels 0-15
    # and 63 are padding, 16-17 come from stage 2, where they live
    blocks = [(1, 16), (16, 16), (16, 16), (32, 32), (2, 32), (32, 32)] + [(64, 47)] * 3
    check_compact(model, variables, masks, resnet_cifar_count(16, blocks))
    blocks = [(8, 16), (16, 16), (16, 16), (32, 32), (8, 32), (32, 32)] + [(64, 48)] * 3
    cmodel, _, desc, _, _ = check_compact(model, variables, masks,
                                          resnet_cifar_count(16, blocks), round_to=8)
    assert desc["round_to"] == 8 and cmodel.block_widths == tuple(blocks)
    blocks = [(16, 16), (16, 16), (16, 16), (32, 32), (16, 32), (32, 32)] + [(64, 48)] * 3
    check_compact(model, variables, masks, resnet_cifar_count(16, blocks), round_to=16)


# ---------------------------------------------------------------- VGG-16
def test_vgg16_internal_and_classifier_channels():
    model = net("vgg16_bn")
    variables = trained_like(model)
    dead = {"features_conv1": range(10), "features_conv6": range(0, 256, 2),
            "features_conv12": range(500)}  # the last conv feeds the classifier
    masks = with_bn(model, variables["params"],
                    channel_masks(variables["params"], dead, stem="features_conv0"))
    widths = list(VGG16)
    widths[1], widths[6], widths[12] = 54, 128, 12
    check_compact(model, variables, masks, vgg_count(widths))


def test_vgg16_mixed():
    model = net("vgg16_bn")
    variables = trained_like(model, seed=4)
    rng = np.random.default_rng(4)
    dead = {f"features_conv{i}": rng.choice(w, size=int(w * 0.7), replace=False).tolist()
            for i, w in enumerate(VGG16) if i > 0}
    masks = channel_masks(variables["params"], dead, unstructured=rng, stem="features_conv0")
    bn_zero = [f"features_conv{i}" for i in range(1, 13, 2)]
    masks = with_bn(model, variables["params"], masks, only=set(bn_zero))
    widths = [w - (len(dead[f"features_conv{i}"]) if f"features_conv{i}" in bn_zero else 0)
              for i, w in enumerate(VGG16)]
    _, _, desc, _, _ = check_compact(model, variables, masks, vgg_count(widths))
    assert desc["pruned_channels_kept"] == sum(len(dead[f"features_conv{i}"])
                                               for i in range(2, 13, 2))


# ---------------------------------------------------------------- MobileNet
def mobilenet_reference(dead, bn_zero, approximate=False):
    """A depthwise channel goes with its input channel: when the depthwise channel is dead
    (its BN zeroed), the previous layer's channel has no other reader and goes too."""
    def gone(module, c):
        return c in dead.get(module, ()) and (approximate or module in bn_zero)

    prev = "conv1"
    widths, stem = [], None
    for i, w in enumerate([32] + MOBILENET):
        if i == len(MOBILENET):
            break
        dw = f"block{i}/conv_dw"
        removed = {c for c in range(w) if gone(dw, c)
                   or (approximate and c in dead.get(prev, ()))}
        if i == 0:
            stem = w - len(removed)
        else:
            widths.append(w - len(removed))
        prev = f"block{i}/conv_pw"
    last = "block12/conv_pw"
    widths.append(1024 - sum(gone(last, c) for c in range(1024)))
    return stem, widths


def test_mobilenet_depthwise_and_pointwise_channels():
    model = net("mobilenet")
    variables = trained_like(model)
    dead = {"block0/conv_dw": [0, 1, 2],          # the stem's channels 0-2 have no reader left
            "block3/conv_pw": range(100),         # feeds block4's depthwise, which lives: kept
            "block5/conv_dw": range(50, 256),     # block4's pointwise channels 50.. go with it
            "block12/conv_pw": range(1000)}       # feeds the classifier
    masks = with_bn(model, variables["params"], channel_masks(variables["params"], dead))
    stem, widths = mobilenet_reference(dead, set(dead))
    assert (stem, widths[4], widths[12]) == (29, 50, 24)
    _, _, desc, _, _ = check_compact(model, variables, masks, mobilenet_count(stem, widths))
    assert desc["pruned_channels_kept"] == 100
    assert desc["layers"]["block5/conv_dw"]["out"] == 50


def test_mobilenet_mixed():
    model = net("mobilenet")
    variables = trained_like(model, seed=5)
    rng = np.random.default_rng(5)
    dead = {}
    for i, w in enumerate(MOBILENET):
        cin = 32 if i == 0 else MOBILENET[i - 1]
        dead[f"block{i}/conv_dw"] = rng.choice(cin, size=cin // 2, replace=False).tolist()
        dead[f"block{i}/conv_pw"] = rng.choice(w, size=w // 2, replace=False).tolist()
    masks = channel_masks(variables["params"], dead, unstructured=rng)
    bn_zero = {m for m in dead if m.endswith("dw") or m == "block12/conv_pw"}
    masks = with_bn(model, variables["params"], masks, only=bn_zero)
    stem, widths = mobilenet_reference(dead, bn_zero)
    check_compact(model, variables, masks, mobilenet_count(stem, widths))


# ---------------------------------------------------------------- other archs
def test_res18_mixed_with_projection_shortcuts():
    model = net("res18")
    variables = trained_like(model, seed=6)
    rng = np.random.default_rng(6)
    dead = {f"layer{s}_{b}/conv1": rng.choice(w, size=w // 2, replace=False).tolist()
            for s, w in zip((1, 2, 3, 4), (64, 128, 256, 512)) for b in range(2)}
    dead.update({f"layer4_{b}/conv2": [7, 9] for b in range(2)})
    dead["layer4_0/shortcut_conv"] = [7]
    masks = with_bn(model, variables["params"], channel_masks(variables["params"], dead))
    cmodel, cvars, desc = compact(model, variables, masks, sample_shape=SHAPE)
    x = images()[:2]
    ref = np.asarray(forward(model)(model_masks.masked_variables(variables, masks), x))
    np.testing.assert_allclose(np.asarray(forward(cmodel)(cvars, x)), ref, rtol=1e-4,
                               atol=1e-4 * np.abs(ref).max())
    assert cmodel.block_widths == tuple((w // 2, w - (1 if s == 4 else 0))
                                        for s, w in zip((1, 2, 3, 4), (64, 128, 256, 512))
                                        for _ in range(2))


# ---------------------------------------------------------------- counting
def res20s_macs(size=32, in_ch=1, widths=(16, 32, 64)):
    total, hw, cin = 9 * in_ch * widths[0] * size * size, size, widths[0]
    for s, w in enumerate(widths):
        for b in range(3):
            if s > 0 and b == 0:
                hw //= 2
            total += hw * hw * 9 * (cin * w + w * w)
            cin = w
    return total + cin * 10


def test_count_flops_and_params_by_arithmetic():
    model = net("res20s")
    variables = trained_like(model)
    got = counting.count_flops(model, variables, SHAPE)
    assert got["macs"] == res20s_macs() and got["flops"] == 2 * res20s_macs()
    full = [(16, 16)] * 3 + [(32, 32)] * 3 + [(64, 64)] * 3
    assert counting.count_params(variables["params"]) == resnet_cifar_count(16, full) == 269_434
    # 3-channel 32x32 res20s: the well-known 40.55M MACs ("41M FLOPs")
    rgb = net("res20s")
    abstract = jax.eval_shape(lambda: rgb.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                               train=False))
    assert counting.count_flops(rgb, abstract, (32, 32, 3))["macs"] == res20s_macs(in_ch=3) == 40_551_040
    # MobileNet: depthwise 3x3 costs 9 MACs per channel and position
    mob = net("mobilenet")
    abstract = jax.eval_shape(lambda: mob.init(jax.random.PRNGKey(0), jnp.zeros((1, *SHAPE)),
                                               train=False))
    hw, cin, total = 32, 32, 9 * 32 * 32 * 32
    for w, s in zip(MOBILENET, [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]):
        hw = math.ceil(hw / s)
        total += hw * hw * (9 * cin + cin * w)
        cin = w
    assert counting.count_flops(mob, abstract, SHAPE)["macs"] == total + 1024 * 10


def test_compact_stats_counts_the_compact_network():
    model = net("res20s")
    variables = trained_like(model)
    dead = {"layer1_0/conv1": range(8), "layer3_1/conv1": range(32)}
    masks = with_bn(model, variables["params"], channel_masks(variables["params"], dead))
    stats = counting.compact_stats(model, variables, masks, SHAPE)
    blocks = [(8, 16)] + [(16, 16)] * 2 + [(32, 32)] * 3 + [(64, 64), (32, 64), (64, 64)]
    assert stats["compact_params"] == resnet_cifar_count(16, blocks)
    removed = 32 * 32 * 9 * (8 * 16 + 8 * 16) + 8 * 8 * 9 * (32 * 64 + 32 * 64)
    assert stats["macs"] == res20s_macs() and stats["compact_macs"] == res20s_macs() - removed
    assert stats["compact_flops"] == 2 * stats["compact_macs"]
    assert stats["channels"] == 3 * 2 * (16 + 32 + 64) == 672
    assert stats["channels"] - stats["channels_kept"] == 40
    assert stats["channel_sparsity"] == pytest.approx(40 / 672)
    assert stats["exact"] and stats["pruned_channels_kept"] == 0
    pruned_weights = 8 * 9 * 16 + 32 * 9 * 64 + 2 * (8 + 32)  # kernels + BN scale/bias
    assert stats["masked_params"] == stats["params"] - pruned_weights


# ---------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def ticket(tmp_path_factory):
    """A res20s ticket on digits in the run layout: save_dir/round_1/final/3."""
    root = tmp_path_factory.mktemp("run")
    model = net("res20s")
    variables = trained_like(model, seed=7)
    dead = {"layer1_1/conv1": range(12), "layer2_2/conv1": range(20)}
    masks = with_bn(model, variables["params"], channel_masks(variables["params"], dead))
    masked = model_masks.masked_variables(variables, masks)
    tree = {**masked, "masks": masks}
    ckpt.save(root / "round_1" / "final", 3, tree, {"arch": "res20s", "dataset": "digits",
                                                    "num_classes": 10})
    ckpt.save(root / "round_0" / "final", 3, tree, {"arch": "res20s", "dataset": "digits",
                                                    "num_classes": 10})
    (root / "config.json").write_text(json.dumps({"arch": "res20s", "dataset": "digits"}))
    return root, model, masked


def test_cli_writes_compact_network_and_reports_json(ticket, tmp_path, capsys):
    from experiments import compact as cli
    root, model, masked = ticket
    out = tmp_path / "out"
    assert cli.main([str(root), "--out", str(out), "--batch_sizes", "1,2", "--runs", "2",
                     "--eval_images", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint"].endswith("round_1/final/3")
    nets_ = result["networks"]
    assert nets_["dense"]["params"] == resnet_cifar_count(16, [(16, 16)] * 3 + [(32, 32)] * 3
                                                          + [(64, 64)] * 3)
    blocks = [(16, 16), (4, 16), (16, 16), (32, 32), (32, 32), (12, 32)] + [(64, 64)] * 3
    assert nets_["compact"]["params"] == resnet_cifar_count(16, blocks)
    assert nets_["compact"]["flops"] == 2 * nets_["compact"]["macs"] < nets_["dense"]["flops"]
    assert set(nets_["compact"]["latency_s"]) == {"1", "2"}
    assert result["exact"] and result["error"]["max_rel"] < 1e-4
    assert result["error"]["top1_agreement"] == 1.0 and "digits" in result["error"]["inputs"]
    assert result["channels"]["removed"] == 32
    description = json.loads((out / "architecture.json").read_text())
    assert description["arch"] == "res20s" and description["family"] == "ResNetCifar"
    # the ticket loader reads what was saved; a checkpoint whose metadata has no image
    # shape (written before it did) takes its data set's
    from rsst_jax import tickets
    raw, meta = ckpt.restore_raw(root / "round_1" / "final", 3)
    ticket = tickets.load(root / "round_1" / "final")
    assert ticket.meta == meta and ticket.network.image_shape == SHAPE
    assert ticket.network.sources["image_shape"] == "data set"
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, raw["params"],
                                                         ticket.params))
    cmodel, cvars = cli.load(out)
    x = images()[:2]
    np.testing.assert_allclose(np.asarray(forward(cmodel)(cvars, x)),
                               np.asarray(forward(model)(masked, x)), rtol=1e-4, atol=1e-4)


def test_cli_table_and_step_directory(ticket, tmp_path, capsys):
    from experiments import compact as cli
    root, _, _ = ticket
    assert cli.main([str(root / "round_0" / "final" / "3"), "--out", str(tmp_path / "o"),
                     "--batch_sizes", "1", "--runs", "1", "--eval_images", "1"]) == 0
    text = capsys.readouterr().out
    assert "round_0/final/3" in text and "compact" in text and "speedup b=1" in text


@pytest.mark.parametrize("argv,message", [
    (["/nonexistent/x"], "/nonexistent/x: no such directory"),
    (["{tmp}"], "is neither an rsst-jax run directory nor an orbax checkpoint"),
    (["{root}/config.json"], "is a file"),
    (["{root}", "--out", "{root}/config.json"], "--out {root}/config.json is a file"),
    (["{root}", "--batch_sizes", "0"], "--batch_sizes"),
])
def test_cli_bad_input_is_one_line_and_exit_2(ticket, tmp_path, capsys, argv, message):
    from experiments import compact as cli
    root, _, _ = ticket
    argv = [a.format(tmp=tmp_path, root=root) for a in argv]
    message = message.format(root=root)
    assert cli.main(["--out", str(tmp_path / "o")] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()  # refused before writing anything
