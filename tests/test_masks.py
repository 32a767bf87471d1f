"""Masks: exact counts against small numpy references, properties, jit behaviour, errors."""
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rsst_jax import masks as mk

# ---------------------------------------------------------------- fixtures and refs


def tiny_params(seed=0, c_stem=4, c1=8, n_cls=10, kh=3):
    """Shaped like a tiny conv net; the stem is created (inserted) first."""
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    return {
        "conv1": {"kernel": f(kh, kh, 1, c_stem)},
        "layer1": {
            "conv1": {"kernel": f(kh, kh, c_stem, c1)},
            "conv2": {"kernel": f(kh, kh, c1, c1)},
            "bn": {"scale": f(c1), "bias": f(c1)},
        },
        "fc": {"kernel": f(c1, n_cls), "bias": f(n_cls)},
    }


def random_masks(params, seed, keep_prob=0.7, **kw):
    rng = np.random.default_rng(seed)
    base = mk.init_masks(params, **kw)
    return jax.tree_util.tree_map(
        lambda m: None if m is None else jnp.asarray(rng.random(m.shape) < keep_prob),
        base,
        is_leaf=lambda x: x is None,
    )


def np_leaves(tree):
    """Prunable (path, np array) pairs of a mask-like tree, in flatten order."""
    return [(p, np.asarray(x)) for p, x in mk._items(tree) if x is not None]


def np_count(rate, n):
    return int(np.round(np.float32(rate) * np.float32(n)))


def ref_remove_lowest(scores, kept, count):
    """Numpy reference: drop the `count` kept entries of lowest score, ties by lower index."""
    idx = np.flatnonzero(kept)
    order = idx[np.lexsort((idx, scores[idx]))]
    out = kept.copy()
    out[order[:count]] = False
    return out


def ref_magnitude(params, masks, rate, scope="global", layer_rates=None):
    ws = dict(np_leaves(jax.tree_util.tree_map(lambda w: w, params)))
    ms = np_leaves(masks)
    if scope == "global":
        scores = np.concatenate([np.abs(ws[p]).ravel() for p, _ in ms])
        kept = np.concatenate([m.ravel() for _, m in ms])
        out = ref_remove_lowest(scores, kept, np_count(rate, kept.sum()))
        res, off = {}, 0
        for p, m in ms:
            res[p] = out[off : off + m.size].reshape(m.shape)
            off += m.size
        return res
    res = {}
    for p, m in ms:
        r = rate
        for pat, mult in (layer_rates or {}).items():
            if re.search(pat, p):
                r = rate * mult
                break
        r = min(max(r, 0.0), 1.0)
        res[p] = ref_remove_lowest(np.abs(ws[p]).ravel(), m.ravel(), np_count(r, m.sum())).reshape(m.shape)
    return res


def ref_filter(params, masks, rate):
    ws = dict(np_leaves(params))
    res = {}
    for p, m in np_leaves(masks):
        w = ws[p]
        l1 = np.abs(np.where(m, w, 0)).reshape(-1, m.shape[-1]).sum(0)
        remaining = m.reshape(-1, m.shape[-1]).any(0)
        keep_ch = ref_remove_lowest(l1, remaining, np_count(rate, remaining.sum()))
        res[p] = m & keep_ch
    return res


def ref_refill(masks, scores, fb):
    sc = dict(np_leaves(scores))
    res = {}
    for p, m in np_leaves(masks):
        c = m.shape[-1]
        f = m.size // c
        n = m.sum() / f
        k = max(1, int(n + (c - n) * fb))
        s = sc[p]
        order = np.lexsort((np.arange(c), -s))
        ch = np.zeros(c, bool)
        ch[order[:k]] = True
        res[p] = np.broadcast_to(ch, m.shape)
    return res


def assert_mask_equal(got, want):
    got_d = dict(np_leaves(got))
    assert set(got_d) == set(want)
    for p in want:
        assert got_d[p].dtype == np.bool_, p
        np.testing.assert_array_equal(got_d[p], want[p], err_msg=p)


def is_subset(new, old):
    return all(not np.any(n & ~o) for (_, n), (_, o) in zip(np_leaves(new), np_leaves(old)))


def kept_total(masks):
    return sum(int(m.sum()) for _, m in np_leaves(masks))


# ---------------------------------------------------------------- prunable, init


def test_prunable_defaults_conv1_fc():
    params = tiny_params()
    p = mk.prunable(params)
    assert p["conv1"]["kernel"] is False
    assert p["layer1"]["conv1"]["kernel"] is True and p["layer1"]["conv2"]["kernel"] is True
    assert p["layer1"]["bn"] == {"scale": False, "bias": False}
    assert p["fc"] == {"kernel": False, "bias": False}
    p = mk.prunable(params, conv1=True, fc=True)
    assert p["conv1"]["kernel"] is True and p["fc"]["kernel"] is True and p["fc"]["bias"] is False


def test_stem_is_first_in_insertion_order_not_sorted_order():
    rng = np.random.default_rng(0)
    params = {
        "z_stem": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 1, 2)), jnp.float32)},
        "a_block": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 2, 2)), jnp.float32)},
    }
    assert mk.stem_path(params) == "z_stem/kernel"
    p = mk.prunable(params)
    assert p == {"z_stem": {"kernel": False}, "a_block": {"kernel": True}}
    assert mk.prunable(params, stem="a_block") == {"z_stem": {"kernel": True}, "a_block": {"kernel": False}}
    assert mk.prunable(params, stem="a_block/kernel") == {"z_stem": {"kernel": True}, "a_block": {"kernel": False}}


def test_stem_of_a_flax_module():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3), name="stem")(x)
            x = nn.Conv(4, (3, 3), name="body")(x)
            return nn.Dense(3, name="head")(x.mean((1, 2)))

    params = Net().init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
    assert mk.stem_path(params) == "stem/kernel"
    masks = mk.init_masks(params)
    assert masks["stem"]["kernel"] is None and masks["head"]["kernel"] is None
    assert masks["body"]["kernel"].shape == (3, 3, 4, 4) and masks["body"]["bias"] is None


def test_init_masks_and_apply_masks():
    params = tiny_params()
    masks = mk.init_masks(params)
    assert mk.tree_paths(masks) == mk.tree_paths(params)
    assert masks["layer1"]["conv1"]["kernel"].dtype == jnp.bool_
    assert bool(masks["layer1"]["conv1"]["kernel"].all())
    masks = random_masks(params, 1)
    out = mk.apply_masks(params, masks)
    for (p, w), (_, m), (_, o) in zip(mk._items(params), mk._items(masks), mk._items(out)):
        w, o = np.asarray(w), np.asarray(o)
        if m is None:
            np.testing.assert_array_equal(o, w)
        else:
            m = np.asarray(m)
            np.testing.assert_array_equal(o[m], w[m])
            assert np.all(o[~m] == 0) and not np.any(np.signbit(o[~m])), p


def test_tree_paths_and_map_helpers():
    params = tiny_params()
    assert mk.tree_paths(params) == [
        "conv1/kernel",
        "fc/bias",
        "fc/kernel",
        "layer1/bn/bias",
        "layer1/bn/scale",
        "layer1/conv1/kernel",
        "layer1/conv2/kernel",
    ]
    masks = mk.init_masks(params)
    sizes = mk.map_prunable(lambda m: m.size, masks)
    assert sizes["layer1"]["conv1"]["kernel"] == 9 * 4 * 8 and sizes["fc"]["kernel"] is None
    doubled = mk.map_masked(lambda w, m: 2 * w, params, masks)
    np.testing.assert_array_equal(doubled["fc"]["kernel"], params["fc"]["kernel"])
    np.testing.assert_array_equal(doubled["layer1"]["conv2"]["kernel"], 2 * params["layer1"]["conv2"]["kernel"])


# ---------------------------------------------------------------- magnitude prune


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 0.93])
def test_magnitude_prune_matches_reference(scope, rate):
    params = tiny_params(3)
    masks = random_masks(params, 4, fc=True)
    new = mk.magnitude_prune(params, masks, rate, scope=scope)
    assert_mask_equal(new, ref_magnitude(params, masks, rate, scope))
    assert is_subset(new, masks)
    if scope == "global":
        n = kept_total(masks)
        assert kept_total(new) == n - np_count(rate, n)


def test_magnitude_prune_ties_remove_lower_flat_index_first():
    params = {"a": {"kernel": jnp.ones((1, 1, 2, 3))}, "b": {"kernel": jnp.ones((1, 1, 1, 4))}}
    masks = mk.init_masks(params, conv1=True)
    # 10 entries, all |w| = 1: round(0.3 * 10) = 3 removed, the first 3 in flatten order.
    new = mk.magnitude_prune(params, masks, 0.3)
    np.testing.assert_array_equal(np.asarray(new["a"]["kernel"]).ravel(), [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(np.asarray(new["b"]["kernel"]).ravel(), [1, 1, 1, 1])
    # Ties at the threshold only: the smaller weight goes, then the lower index.
    params = {"a": {"kernel": jnp.asarray([2.0, -1.0, 1.0, 0.5, 1.0, 3.0]).reshape(1, 1, 2, 3)}}
    new = mk.magnitude_prune(params, mk.init_masks(params, conv1=True), 0.5)
    np.testing.assert_array_equal(np.asarray(new["a"]["kernel"]).ravel(), [1, 0, 0, 0, 1, 1])


def test_already_pruned_entries_stay_pruned_even_if_large():
    params = {"a": {"kernel": jnp.asarray([100.0, 1.0, 2.0, 3.0]).reshape(1, 1, 1, 4)}}
    masks = {"a": {"kernel": jnp.asarray([False, True, True, True]).reshape(1, 1, 1, 4)}}
    new = mk.magnitude_prune(params, masks, 0.34)  # round(0.34 * 3) = 1
    np.testing.assert_array_equal(np.asarray(new["a"]["kernel"]).ravel(), [0, 0, 1, 1])


def test_repeated_global_prunes_follow_geometric_density():
    params = tiny_params(5, c_stem=8, c1=16)
    masks = mk.init_masks(params)
    total = kept_total(masks)
    n = total
    for k in range(1, 9):
        masks = mk.magnitude_prune(params, masks, 0.2)
        n -= np_count(0.2, n)
        assert kept_total(masks) == n
        assert abs(mk.density(masks) - 0.8**k) <= k / total
    assert mk.density(masks) == pytest.approx(0.8**8, abs=8 / total)


def test_layer_rates_first_match_wins_and_clip():
    params = tiny_params(6)
    masks = mk.init_masks(params, fc=True)
    layer_rates = {r"layer1/conv1": 0.5, r"layer1": 3.0, r"^fc": 0.0}
    new = mk.magnitude_prune(params, masks, 0.4, scope="layerwise", layer_rates=layer_rates)
    assert_mask_equal(new, ref_magnitude(params, masks, 0.4, "layerwise", layer_rates))
    d = dict(np_leaves(new))
    assert d["layer1/conv1/kernel"].sum() == 288 - np_count(0.2, 288)
    assert d["layer1/conv2/kernel"].sum() == 0  # 0.4 * 3.0 clipped to 1
    assert d["fc/kernel"].all()


# ---------------------------------------------------------------- random, filter


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_random_prune_counts_and_subset(scope):
    params = tiny_params(7)
    masks = random_masks(params, 8)
    new = mk.random_prune(jax.random.PRNGKey(0), masks, 0.3, scope=scope)
    assert is_subset(new, masks)
    if scope == "global":
        n = kept_total(masks)
        assert kept_total(new) == n - np_count(0.3, n)
    else:
        for (p, m), (_, o) in zip(np_leaves(new), np_leaves(masks)):
            assert m.sum() == o.sum() - np_count(0.3, o.sum()), p
    again = mk.random_prune(jax.random.PRNGKey(0), masks, 0.3, scope=scope)
    other = mk.random_prune(jax.random.PRNGKey(1), masks, 0.3, scope=scope)
    assert_mask_equal(again, dict(np_leaves(new)))
    assert any(np.any(a != b) for (_, a), (_, b) in zip(np_leaves(new), np_leaves(other)))


def test_random_prune_is_roughly_uniform():
    masks = {"a": {"kernel": jnp.ones((1, 1, 1, 10), bool)}}
    hits = np.zeros(10)
    for s in range(200):
        new = mk.random_prune(jax.random.PRNGKey(s), masks, 0.5)
        hits += ~np.asarray(new["a"]["kernel"]).ravel()
    assert hits.sum() == 200 * 5
    assert hits.min() > 60 and hits.max() < 140  # each entry removed ~100 times


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 0.9])
def test_filter_prune_matches_reference(rate):
    params = tiny_params(9)
    masks = random_masks(params, 10, keep_prob=0.9, fc=True)
    new = mk.filter_prune(params, masks, rate)
    assert_mask_equal(new, ref_filter(params, masks, rate))
    assert is_subset(new, masks)
    for (p, m), (_, o) in zip(np_leaves(new), np_leaves(masks)):
        alive = m.reshape(-1, m.shape[-1]).any(0)
        before = o.reshape(-1, o.shape[-1]).any(0)
        assert alive.sum() == before.sum() - np_count(rate, before.sum()), p
        removed = before & ~alive
        assert not m[..., removed].any()


def test_filter_prune_ties_lower_channel_first_and_dead_channels_ignored():
    w = jnp.ones((1, 1, 2, 4))
    masks = {"a": {"kernel": jnp.asarray([[True, False, True, True], [True, False, True, True]]).reshape(1, 1, 2, 4)}}
    new = mk.filter_prune({"a": {"kernel": w}}, masks, 0.34)  # f = 3 remaining -> remove 1
    np.testing.assert_array_equal(np.asarray(new["a"]["kernel"]).reshape(2, 4).any(0), [False, False, True, True])


# ---------------------------------------------------------------- refill, targets


def hand_mask(c, f, kept_per_channel):
    """[1, f, c] mask (so F = f) with the first kept_per_channel[i] entries of channel i True."""
    m = np.zeros((1, f, c), bool)
    for i, k in enumerate(kept_per_channel):
        m[0, :k, i] = True
    return {"l": {"kernel": jnp.asarray(m)}}


@pytest.mark.parametrize(
    "kept_per_channel, fb, k",
    [
        ([4, 4, 4, 4], 0.0, 4),  # nothing pruned: all channels stay
        ([4, 3, 2, 0], 0.0, 2),  # n = 9/4 = 2.25 -> 2
        ([1, 1, 0, 0], 0.0, 1),  # n = 0.5 -> max(1, 0)
        ([0, 0, 0, 0], 0.0, 1),
        ([4, 3, 2, 0], 0.5, 3),  # 2.25 + 1.75 * 0.5 = 3.125
        ([1, 1, 0, 0], 0.5, 2),  # 0.5 + 3.5 * 0.5 = 2.25
        ([4, 4, 0, 0], 0.5, 3),  # 2 + 2 * 0.5 = 3
        ([0, 0, 0, 0], 1.0, 4),
    ],
)
def test_refill_k_formula(kept_per_channel, fb, k):
    masks = hand_mask(4, 4, kept_per_channel)
    scores = {"l": {"kernel": jnp.asarray([0.1, 0.4, 0.3, 0.2])}}
    out = np.asarray(mk.refill(masks, scores, fb)["l"]["kernel"])
    ch = out.reshape(-1, 4)
    assert (ch.all(0) | ~ch.any(0)).all()  # channel-wise
    want = np.zeros(4, bool)
    want[np.argsort(-np.asarray([0.1, 0.4, 0.3, 0.2]))[:k]] = True
    np.testing.assert_array_equal(ch.all(0), want)


def test_refill_k_uses_python_float_semantics():
    # 0.7 * 10 is 7.000000000000001 in float64 (6.99999... with exact rationals): k = 7.
    masks = {"l": {"kernel": jnp.zeros((1, 1, 1, 10), bool)}}
    scores = {"l": {"kernel": jnp.arange(10.0)}}
    out = np.asarray(mk.refill(masks, scores, 0.7)["l"]["kernel"]).ravel()
    assert out.sum() == int(0 + (10 - 0) * 0.7) == 7


def test_refill_ties_higher_score_then_lower_index():
    masks = hand_mask(5, 2, [2, 2, 2, 0, 0])  # n = 3
    scores = {"l": {"kernel": jnp.asarray([1.0, 5.0, 1.0, 1.0, 5.0])}}
    out = np.asarray(mk.refill(masks, scores)["l"]["kernel"]).reshape(-1, 5)
    np.testing.assert_array_equal(out.all(0), [True, True, False, False, True])
    assert (out.all(0) | ~out.any(0)).all()


def test_refill_matches_reference_and_none_elsewhere():
    params = tiny_params(11)
    masks = mk.magnitude_prune(params, mk.init_masks(params), 0.6)
    rng = np.random.default_rng(0)
    scores = mk.map_prunable(lambda m: jnp.asarray(rng.standard_normal(m.shape[-1]), jnp.float32), masks)
    for fb in (0.0, 0.3):
        out = mk.refill(masks, scores, fb)
        assert out["fc"]["kernel"] is None and out["conv1"]["kernel"] is None
        assert_mask_equal(out, ref_refill(masks, scores, fb))


def test_rsst_targets_nonempty_when_channel_mask_differs():
    params = tiny_params(12)
    masks = mk.magnitude_prune(params, mk.init_masks(params), 0.5)
    scores = mk.map_masked(lambda w, m: jnp.abs(w * m).sum((0, 1, 2)), params, masks)
    scores = mk.map_prunable(lambda m, s: s, masks, scores)
    channel = mk.refill(masks, scores)
    targets = mk.rsst_targets(masks, channel)
    assert kept_total(targets) > 0
    for (p, t), (_, m), (_, s) in zip(np_leaves(targets), np_leaves(masks), np_leaves(channel)):
        np.testing.assert_array_equal(t, m & ~s, err_msg=p)
    assert targets["fc"]["kernel"] is None
    assert kept_total(mk.rsst_targets(masks, masks)) == 0
    # The inputs are values: computing S did not change M.
    assert kept_total(masks) == kept_total(mk.magnitude_prune(params, mk.init_masks(params), 0.5))


# ---------------------------------------------------------------- reports


def test_density_channel_sparsity_and_report():
    masks = {
        "a": {"kernel": jnp.asarray(np.array([[1, 0, 0], [1, 0, 1]], bool).reshape(1, 1, 2, 3))},
        "b": {"kernel": jnp.ones((1, 1, 1, 2), bool), "bias": None},
    }
    assert mk.density(masks) == pytest.approx(5 / 8)
    assert mk.channel_sparsity(masks) == pytest.approx(1 / 5)
    params = {"a": {"kernel": jnp.ones((1, 1, 2, 3))}, "b": {"kernel": jnp.ones((1, 1, 1, 2)), "bias": jnp.ones(2)}}
    rows = mk.report(masks, mk.apply_masks(params, masks))
    assert [(r.path, r.kept, r.total, r.channels_kept, r.channels_total, r.nonzero) for r in rows] == [
        ("a/kernel", 3, 6, 2, 3, 3),
        ("b/kernel", 2, 2, 2, 2, 2),
    ]
    text = mk.format_report(rows)
    lines = text.splitlines()
    assert lines[0].startswith("path") and lines[-1].startswith("total")
    assert "62.50%" in lines[-1] and "4/5" in lines[-1]
    assert len({len(line) for line in lines if not line.startswith("-")}) <= 2
    assert "nonzero" not in mk.format_report(mk.report(masks))


# ---------------------------------------------------------------- optimizer, jit


def test_keep_pruned_three_elements():
    tx = mk.keep_pruned()
    u = jnp.asarray([1.0, -2.0, 3.0])
    state = tx.init(u)
    out, _ = tx.update(u, state, masks=jnp.asarray([True, False, True]))
    np.testing.assert_array_equal(out, [1.0, 0.0, 3.0])
    same, _ = tx.update(u, state)
    np.testing.assert_array_equal(same, u)
    out, _ = jax.jit(lambda u, m: tx.update(u, state, masks=m))(u, jnp.asarray([False, True, False]))
    np.testing.assert_array_equal(out, [0.0, -2.0, 0.0])


def test_keep_pruned_in_chain_keeps_pruned_weights_at_zero_and_compiles_once():
    params = tiny_params(13)
    tx = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1, momentum=0.9), mk.keep_pruned())
    traces = []

    @jax.jit
    def step(params, opt_state, masks):
        traces.append(1)
        grads = jax.tree_util.tree_map(jnp.ones_like, params)
        updates, opt_state = tx.update(grads, opt_state, params, masks=masks)
        return optax.apply_updates(params, updates), opt_state

    for seed in (1, 2):
        masks = random_masks(params, seed)
        p = mk.apply_masks(params, masks)
        state = tx.init(p)
        for _ in range(3):
            p, state = step(p, state, masks)
        weights = dict(mk._items(p))
        for path, m in np_leaves(masks):
            assert np.all(np.asarray(weights[path])[~m] == 0), path
        assert not np.allclose(p["fc"]["kernel"], params["fc"]["kernel"])  # unmasked leaves move
    assert len(traces) == 1


def test_jitted_functions_compile_once_for_different_mask_contents():
    params = tiny_params(14)
    traces = []

    @functools.partial(jax.jit, static_argnames=("rate", "fb"))
    def round_(params, masks, scores, rate, fb):
        traces.append(1)
        pruned = mk.magnitude_prune(params, masks, rate)
        channel = mk.refill(pruned, scores, fb)
        return mk.apply_masks(params, pruned), pruned, channel, mk.rsst_targets(pruned, channel)

    scores = mk.map_prunable(lambda m: jnp.arange(m.shape[-1], dtype=jnp.float32), mk.init_masks(params))
    for seed in (1, 2):
        masks = random_masks(params, seed)
        _, pruned, channel, _ = round_(params, masks, scores, rate=0.2, fb=0.1)
        assert_mask_equal(pruned, ref_magnitude(params, masks, 0.2))
        assert_mask_equal(channel, ref_refill(pruned, scores, 0.1))
    assert len(traces) == 1
    jitted_filter = jax.jit(lambda p, m: (traces.append(1), mk.filter_prune(p, m, 0.3))[1])
    for seed in (3, 4):
        masks = random_masks(params, seed)
        assert_mask_equal(jitted_filter(params, masks), ref_filter(params, masks, 0.3))
    jitted_random = jax.jit(lambda k, m: (traces.append(1), mk.random_prune(k, m, 0.3))[1])
    for seed in (5, 6):
        masks = random_masks(params, seed)
        assert kept_total(jitted_random(jax.random.PRNGKey(seed), masks)) == kept_total(masks) - np_count(
            0.3, kept_total(masks)
        )
    assert len(traces) == 3


# ---------------------------------------------------------------- errors


def test_errors_name_the_value_or_leaf():
    params = tiny_params()
    masks = mk.init_masks(params)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=re.escape(f"rate={bad}")):
            mk.magnitude_prune(params, masks, bad)
    with pytest.raises(ValueError, match="rate=1.0"):
        mk.filter_prune(params, masks, 1.0)
    with pytest.raises(ValueError, match="rate=-0.5"):
        mk.random_prune(jax.random.PRNGKey(0), masks, -0.5)
    with pytest.raises(ValueError, match="'bogus'"):
        mk.magnitude_prune(params, masks, 0.2, scope="bogus")
    with pytest.raises(ValueError, match="scope='layerwise'"):
        mk.magnitude_prune(params, masks, 0.2, layer_rates={"layer1": 0.5})
    with pytest.raises(ValueError, match=r"'\[unclosed'"):
        mk.magnitude_prune(params, masks, 0.2, scope="layerwise", layer_rates={"[unclosed": 0.5})
    with pytest.raises(ValueError, match="fillback_rate=1.5"):
        mk.refill(masks, mk.map_prunable(lambda m: jnp.zeros(m.shape[-1]), masks), 1.5)

    wrong_shape = jax.tree_util.tree_map(lambda m: m, masks, is_leaf=lambda x: x is None)
    wrong_shape["layer1"]["conv2"]["kernel"] = jnp.ones((3, 3, 8, 7), bool)
    with pytest.raises(ValueError, match="layer1/conv2/kernel"):
        mk.apply_masks(params, wrong_shape)
    wrong_dtype = dict(masks, layer1=dict(masks["layer1"], conv1={"kernel": jnp.ones((3, 3, 4, 8))}))
    with pytest.raises(ValueError, match="layer1/conv1/kernel.*bool"):
        mk.magnitude_prune(params, wrong_dtype, 0.2)
    missing = dict(masks, layer1={k: v for k, v in masks["layer1"].items() if k != "bn"})
    with pytest.raises(ValueError, match="layer1/bn/bias"):
        mk.check_masks(params, missing)
    with pytest.raises(ValueError, match="layer1/conv1/kernel"):
        mk.refill(masks, mk.map_prunable(lambda m: jnp.zeros(3), masks))
    with pytest.raises(ValueError, match="'nope'"):
        mk.prunable(params, stem="nope")
    with pytest.raises(ValueError, match="layer1/conv1/kernel"):
        mk.rsst_targets(masks, wrong_dtype)


# ---------------------------------------------------------------- properties

# A few shapes (each new structure compiles once); masks, weights and rates vary freely.
shapes = st.sampled_from([(1, 1, 1), (3, 2, 3), (1, 5, 2), (3, 4, 6)])


@st.composite
def masked_params(draw):
    kh, c1, c2 = draw(shapes)
    seed = draw(st.integers(0, 2**16))
    params = tiny_params(seed, c_stem=c1, c1=c2, n_cls=3, kh=kh)
    keep = draw(st.floats(0.0, 1.0))
    wide = draw(st.booleans())  # also prune the stem and the classifier
    masks = random_masks(params, seed + 1, keep_prob=keep, conv1=wide, fc=wide)
    return params, masks


rates = st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.5, 0.75, 0.9, 0.99])


@given(masked_params(), rates, st.sampled_from(["global", "layerwise"]))
def test_property_magnitude_prune(pm, rate, scope):
    params, masks = pm
    new = mk.magnitude_prune(params, masks, rate, scope=scope)
    assert_mask_equal(new, ref_magnitude(params, masks, rate, scope))
    assert is_subset(new, masks)


@given(masked_params(), rates, st.sampled_from(["global", "layerwise"]), st.integers(0, 100))
def test_property_random_prune_counts(pm, rate, scope, seed):
    _, masks = pm
    new = mk.random_prune(jax.random.PRNGKey(seed), masks, rate, scope=scope)
    assert is_subset(new, masks)
    if scope == "global":
        n = kept_total(masks)
        assert kept_total(new) == n - np_count(rate, n)
    else:
        for (_, m), (_, o) in zip(np_leaves(new), np_leaves(masks)):
            assert m.sum() == o.sum() - np_count(rate, o.sum())


@given(masked_params(), rates)
def test_property_filter_prune(pm, rate):
    params, masks = pm
    new = mk.filter_prune(params, masks, rate)
    assert_mask_equal(new, ref_filter(params, masks, rate))
    assert is_subset(new, masks)


@given(masked_params(), st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 1.0]), st.integers(0, 3))
def test_property_refill_channelwise_exactly_k(pm, fb, levels):
    _, masks = pm
    rng = np.random.default_rng(levels)
    # Few distinct score values, so ties are common.
    scores = mk.map_prunable(lambda m: jnp.asarray(rng.integers(0, levels + 1, m.shape[-1]), jnp.float32), masks)
    out = mk.refill(masks, scores, fb)
    assert_mask_equal(out, ref_refill(masks, scores, fb))
    for (p, o), (_, m) in zip(np_leaves(out), np_leaves(masks)):
        ch = o.reshape(-1, o.shape[-1])
        assert (ch.all(0) | ~ch.any(0)).all(), p
        c, f = m.shape[-1], m.size // m.shape[-1]
        n = m.sum() / f
        assert ch.all(0).sum() == max(1, int(n + (c - n) * fb)), p
