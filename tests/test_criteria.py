"""Channel criteria against direct computations on a toy two-conv network."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from rsst_jax import criteria
from rsst_jax.criteria import available_criteria, channel_scores, hutchinson_diag, register_criterion

ALL = ("remain", "magnitude", "l1", "l2", "saliency", "hessian")
BN_EPS = 1e-5


class Toy(nn.Module):
    """conv1 3x3 (1->c1), relu, conv2 3x3 (c1->c2, no bias), BN, relu, GAP, fc."""

    c1: int = 4
    c2: int = 6
    classes: int = 3

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(self.c1, (3, 3), name="conv1")(x))
        x = nn.Conv(self.c2, (3, 3), use_bias=False, name="conv2")(x)
        x = nn.BatchNorm(use_running_average=not train, epsilon=BN_EPS, name="bn2")(x)
        x = jnp.mean(nn.relu(x), axis=(1, 2))
        return nn.Dense(self.classes, name="fc")(x)


def make_toy(seed, c1=4, c2=6, hw=6, n=5):
    model = Toy(c1, c2)
    rng = np.random.default_rng(seed)  # numpy: no per-op compilation in test setup
    x = rng.normal(size=(n, hw, hw, 1)).astype(np.float32)
    y = rng.integers(0, 3, size=n).astype(np.int32)
    v = jax.jit(model.init)(jax.random.key(seed), x)
    params = dict(v["params"])
    def f32(a):
        return np.asarray(a, np.float32)

    # Non-trivial BatchNorm: eval mode must use these running statistics.
    params["bn2"] = {"scale": f32(1 + 0.3 * rng.normal(size=c2)), "bias": f32(0.2 * rng.normal(size=c2))}
    stats = {"bn2": {"mean": f32(0.1 * rng.normal(size=c2)), "var": f32(rng.uniform(0.5, 2.0, size=c2))}}
    variables = {"params": params, "batch_stats": stats}
    masks = {
        "conv1": {"kernel": rng.random(params["conv1"]["kernel"].shape) < 0.6, "bias": None},
        "conv2": {"kernel": rng.random(params["conv2"]["kernel"].shape) < 0.6},
        "bn2": {"scale": None, "bias": None},
        "fc": {"kernel": None, "bias": None},
    }
    return model, variables, masks, (x, y)


# --- a hand-written forward pass, with the conv outputs as explicit values -----------


def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def masked_kernels(variables, masks):
    p = variables["params"]
    return p["conv1"]["kernel"] * masks["conv1"]["kernel"], p["conv2"]["kernel"] * masks["conv2"]["kernel"]


def a1_of(variables, masks, x):
    k1, _ = masked_kernels(variables, masks)
    return conv(x, k1) + variables["params"]["conv1"]["bias"]


def rest_from_a2(variables, a2):
    p, s = variables["params"], variables["batch_stats"]
    h = (a2 - s["bn2"]["mean"]) / jnp.sqrt(s["bn2"]["var"] + BN_EPS) * p["bn2"]["scale"] + p["bn2"]["bias"]
    h = jnp.mean(jax.nn.relu(h), axis=(1, 2))
    return h @ p["fc"]["kernel"] + p["fc"]["bias"]


def a2_from_a1(variables, masks, a1):
    _, k2 = masked_kernels(variables, masks)
    return conv(jax.nn.relu(a1), k2)


def ce(logits, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def per_channel(a):
    a = np.asarray(a, np.float64)
    return a.reshape(-1, a.shape[-1]).sum(0)


@pytest.fixture(scope="module")
def toy():
    return make_toy(0)


def test_hand_forward_matches_model(toy):
    model, variables, masks, (x, y) = toy
    k1, k2 = masked_kernels(variables, masks)
    mv = {**variables, "params": {**variables["params"], "conv1": {**variables["params"]["conv1"], "kernel": k1}, "conv2": {"kernel": k2}}}
    a1 = a1_of(variables, masks, x)
    np.testing.assert_allclose(rest_from_a2(variables, a2_from_a1(variables, masks, a1)), model.apply(mv, x), rtol=1e-5, atol=1e-5)


def test_structure_and_dtype(toy):
    model, variables, masks, batch = toy
    s = channel_scores("l1", model.apply, variables, masks, batch)
    assert s["conv1"]["kernel"].shape == (4,) and s["conv2"]["kernel"].shape == (6,)
    assert s["conv1"]["kernel"].dtype == jnp.float32
    assert s["conv1"]["bias"] is None and s["fc"]["kernel"] is None and s["bn2"]["scale"] is None
    assert jax.tree_util.tree_structure(s, is_leaf=lambda a: a is None) == jax.tree_util.tree_structure(
        masks, is_leaf=lambda a: a is None
    )


def test_remain_and_magnitude(toy):
    model, variables, masks, batch = toy
    remain = channel_scores("remain", model.apply, variables, masks, batch)
    mag = channel_scores("magnitude", model.apply, variables, masks, batch)
    for name in ("conv1", "conv2"):
        m = masks[name]["kernel"]
        w = np.asarray(variables["params"][name]["kernel"])
        np.testing.assert_array_equal(remain[name]["kernel"], m.reshape(-1, m.shape[-1]).sum(0))
        np.testing.assert_allclose(mag[name]["kernel"], (np.abs(w) * m).reshape(-1, m.shape[-1]).sum(0), rtol=1e-6)


def test_l1_l2_read_each_layers_own_output(toy):
    model, variables, masks, (x, y) = toy
    a1 = a1_of(variables, masks, x)
    a2 = a2_from_a1(variables, masks, a1)
    l1 = channel_scores("l1", model.apply, variables, masks, (x, y))
    l2 = channel_scores("l2", model.apply, variables, masks, (x, y))
    np.testing.assert_allclose(l1["conv1"]["kernel"], per_channel(np.abs(a1)), rtol=1e-5)
    np.testing.assert_allclose(l1["conv2"]["kernel"], per_channel(np.abs(a2)), rtol=1e-5)
    np.testing.assert_allclose(l2["conv1"]["kernel"], per_channel(np.square(a1)), rtol=1e-5)
    np.testing.assert_allclose(l2["conv2"]["kernel"], per_channel(np.square(a2)), rtol=1e-5)


def test_saliency_is_abs_a_times_dloss_da(toy):
    model, variables, masks, (x, y) = toy
    a1 = a1_of(variables, masks, x)
    a2 = a2_from_a1(variables, masks, a1)
    g1 = jax.grad(lambda a: ce(rest_from_a2(variables, a2_from_a1(variables, masks, a)), y))(a1)
    g2 = jax.grad(lambda a: ce(rest_from_a2(variables, a), y))(a2)
    s = channel_scores("saliency", model.apply, variables, masks, (x, y))
    np.testing.assert_allclose(s["conv1"]["kernel"], per_channel(np.abs(a1 * g1)), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(s["conv2"]["kernel"], per_channel(np.abs(a2 * g2)), rtol=1e-4, atol=1e-8)
    assert np.sum(np.asarray(s["conv2"]["kernel"])) > 0  # not vacuous (a channel dead after relu scores 0)


def test_dense_kernel_scores_its_own_logits(toy):
    model, variables, masks, (x, y) = toy
    p = variables["params"]
    fc_mask = np.ones(p["fc"]["kernel"].shape, bool)
    fc_mask[0, :] = False
    masks = {**masks, "fc": {"kernel": fc_mask, "bias": None}}
    a2 = a2_from_a1(variables, masks, a1_of(variables, masks, x))
    masked_vars = {**variables, "params": {**p, "fc": {**p["fc"], "kernel": p["fc"]["kernel"] * fc_mask}}}
    logits = rest_from_a2(masked_vars, a2)
    s = channel_scores("l1", model.apply, variables, masks, (x, y))
    np.testing.assert_allclose(s["fc"]["kernel"], per_channel(np.abs(logits)), rtol=1e-5)
    np.testing.assert_array_equal(channel_scores("remain", model.apply, variables, masks, (x, y))["fc"]["kernel"], [5, 5, 5])


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(4, (3, 3), use_bias=False, name="conv")(nn.relu(x))


class SameWidth(nn.Module):
    """Two 4-channel convs, the second nested, so a shared activation would give equal scores."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(4, (3, 3), name="stem")(x)
        x = Block(name="block")(x)
        return nn.Dense(2, name="head")(jnp.mean(x, axis=(1, 2)))


class Shared(nn.Module):
    """One conv applied twice: its score sums both calls."""

    @nn.compact
    def __call__(self, x, train=False):
        c = nn.Conv(4, (3, 3), name="conv")
        x = c(nn.relu(c(x)))
        return nn.Dense(2, name="head")(jnp.mean(x, axis=(1, 2)))


def _intermediates(model, variables, x):
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    return state["intermediates"]


def test_different_layers_get_their_own_scores_nested_paths():
    model = SameWidth()
    x = jax.random.normal(jax.random.key(1), (3, 5, 5, 4))
    variables = model.init(jax.random.key(2), x)
    masks = jax.tree_util.tree_map_with_path(
        lambda p, w: np.ones(w.shape, bool) if p[-1].key == "kernel" and p[0].key != "head" else None, variables["params"]
    )
    s = channel_scores("l2", model.apply, variables, masks, (x, jnp.zeros(3, jnp.int32)))
    inter = _intermediates(model, variables, x)  # flax's own record of every module's output
    np.testing.assert_allclose(s["stem"]["kernel"], per_channel(np.square(inter["stem"]["__call__"][0])), rtol=1e-5)
    np.testing.assert_allclose(s["block"]["conv"]["kernel"], per_channel(np.square(inter["block"]["conv"]["__call__"][0])), rtol=1e-5)
    assert not np.allclose(s["stem"]["kernel"], s["block"]["conv"]["kernel"])


def test_module_called_twice_sums_both_outputs():
    model = Shared()
    x = jax.random.normal(jax.random.key(3), (2, 5, 5, 4))
    variables = model.init(jax.random.key(4), x)
    masks = {"conv": {"kernel": np.ones((3, 3, 4, 4), bool), "bias": None}, "head": {"kernel": None, "bias": None}}
    s = channel_scores("l1", model.apply, variables, masks, (x, jnp.zeros(2, jnp.int32)))
    outs = _intermediates(model, variables, x)["conv"]["__call__"]
    assert len(outs) == 2
    np.testing.assert_allclose(s["conv"]["kernel"], per_channel(np.abs(outs[0])) + per_channel(np.abs(outs[1])), rtol=1e-5)
    sal = channel_scores("saliency", model.apply, variables, masks, (x, jnp.zeros(2, jnp.int32)))
    assert np.all(np.isfinite(sal["conv"]["kernel"]))


@pytest.mark.parametrize("name", ALL)
def test_pruned_weights_do_not_contribute(toy, name):
    model, variables, masks, batch = toy
    p = variables["params"]
    noisy = {**p}
    for i, layer in enumerate(("conv1", "conv2")):
        w, m = p[layer]["kernel"], masks[layer]["kernel"]
        noise = 10 * np.random.default_rng(10 + i).normal(size=w.shape).astype(np.float32)
        noisy[layer] = {**p[layer], "kernel": jnp.where(m, w, noise)}
    key = jax.random.key(5)
    a = channel_scores(name, model.apply, variables, masks, batch, key=key)
    b = channel_scores(name, model.apply, {**variables, "params": noisy}, masks, batch, key=key)
    for layer in ("conv1", "conv2"):
        np.testing.assert_allclose(a[layer]["kernel"], b[layer]["kernel"], rtol=1e-6, atol=1e-9)


def test_num_batches_sums_over_batches(toy):
    model, variables, masks, b1 = toy
    b2 = make_toy(0, n=7)[3]
    b2 = (b2[0] * 2 + 1, b2[1])
    one = channel_scores("l1", model.apply, variables, masks, b1)
    two = channel_scores("l1", model.apply, variables, masks, b2)
    both = channel_scores("l1", model.apply, variables, masks, [b1, b2, b2], num_batches=2)
    first = channel_scores("l1", model.apply, variables, masks, iter([b1, b2]), num_batches=1)
    for layer in ("conv1", "conv2"):
        np.testing.assert_allclose(both[layer]["kernel"], one[layer]["kernel"] + two[layer]["kernel"], rtol=1e-5)
        np.testing.assert_allclose(first[layer]["kernel"], one[layer]["kernel"], rtol=1e-6)
    # Data-free criteria do not scale with the number of batches.
    r1 = channel_scores("remain", model.apply, variables, masks, b1)
    r2 = channel_scores("remain", model.apply, variables, masks, [b1, b2], num_batches=2)
    np.testing.assert_array_equal(r1["conv2"]["kernel"], r2["conv2"]["kernel"])


def test_registry():
    assert set(ALL) <= set(available_criteria())
    with pytest.raises(ValueError, match=r"'nope'.*magnitude.*remain"):
        channel_scores("nope", None, {"params": {}}, {}, None)
    with pytest.raises(ValueError, match="already registered"):
        register_criterion("l1")(lambda ctx, x, y, key: {})


def test_custom_criterion(toy):
    model, variables, masks, batch = toy
    name = "test_sum_of_squares_plus_batch"
    try:

        @register_criterion(name)
        def _custom(ctx, x, y, key):
            return {p: jnp.sum(jnp.square(k), axis=(0, 1, 2)) + x.shape[0] for p, k in ctx.kernels.items()}

        assert name in available_criteria()
        s = channel_scores(name, model.apply, variables, masks, batch)
        w = np.asarray(variables["params"]["conv2"]["kernel"]) * masks["conv2"]["kernel"]
        np.testing.assert_allclose(s["conv2"]["kernel"], np.square(w).sum((0, 1, 2)) + 5, rtol=1e-5)
    finally:
        criteria._CRITERIA.pop(name, None)


def test_hessian_needs_key(toy):
    model, variables, masks, batch = toy
    with pytest.raises(ValueError, match="key"):
        channel_scores("hessian", model.apply, variables, masks, batch)


# --- Hessian ----------------------------------------------------------------------------


def test_hutchinson_exact_for_diagonal_hessian():
    a = jnp.array([0.5, -2.0, 3.0, 7.0])
    def f(w):
        return 0.5 * jnp.sum(a * w["u"] ** 2) + jnp.sum(w["v"] ** 4)

    w = {"u": jnp.ones(4), "v": jnp.array([1.0, -2.0])}
    d = hutchinson_diag(f, w, jax.random.key(0), 1)  # v_i^2 = 1: one probe is exact
    np.testing.assert_allclose(d["u"], a, rtol=1e-6)
    np.testing.assert_allclose(d["v"], 12 * w["v"] ** 2, rtol=1e-6)


def test_hutchinson_within_its_variance():
    rng = np.random.default_rng(0)
    b = rng.normal(size=(12, 12))
    h = (b + b.T) / 2
    def f(w):
        return 0.5 * w @ jnp.asarray(h, jnp.float32) @ w

    samples = 400
    d = hutchinson_diag(f, jnp.zeros(12), jax.random.key(1), samples)
    # Per probe, v_i (Hv)_i = H_ii + sum_{j!=i} H_ij v_i v_j: variance sum_{j!=i} H_ij^2.
    sigma = np.sqrt(((h**2).sum(1) - np.diag(h) ** 2) / samples)
    assert np.all(np.abs(np.asarray(d) - np.diag(h)) <= 4 * sigma)


@pytest.fixture(scope="module")
def tiny():
    """A toy small enough for the exact Hessian (18 + 54 kernel weights)."""
    model, variables, masks, batch = make_toy(7, c1=2, c2=3, hw=4, n=4)
    (x, y) = batch
    p = variables["params"]
    kernels = {"conv1": p["conv1"]["kernel"], "conv2": p["conv2"]["kernel"]}
    theta, unravel = ravel_pytree(kernels)

    def loss(t):
        k = unravel(t)
        params = {**p, "conv1": {**p["conv1"], "kernel": k["conv1"] * masks["conv1"]["kernel"]},
                  "conv2": {"kernel": k["conv2"] * masks["conv2"]["kernel"]}}
        return ce(model.apply({**variables, "params": params}, x), y)

    h = np.asarray(jax.jit(jax.hessian(loss))(theta), np.float64)
    mflat = np.asarray(ravel_pytree({n: jnp.asarray(masks[n]["kernel"], jnp.float32) for n in kernels})[0])
    wflat = np.asarray(theta) * mflat
    # Channel c of a layer, as an indicator over the flat kernel vector.
    channels = {}
    for n in kernels:
        for c in range(kernels[n].shape[-1]):
            ind = {m: jnp.zeros_like(kernels[m]) for m in kernels}
            ind[n] = ind[n].at[..., c].set(1.0)
            channels[(n, c)] = np.asarray(ravel_pytree(ind)[0], bool)
    return model, variables, masks, batch, h, wflat, channels


def test_hessian_formula_with_exact_diag(tiny, monkeypatch):
    model, variables, masks, batch, h, wflat, channels = tiny
    exact = {k: 0.5 * np.sum(np.diag(h)[ind] * wflat[ind] ** 2) for k, ind in channels.items()}

    def exact_diag(f, params, key, samples):
        t, unravel = ravel_pytree(params)
        return unravel(jnp.diag(jax.hessian(lambda u: f(unravel(u)))(t)))

    monkeypatch.setattr(criteria, "hutchinson_diag", exact_diag)
    # hessian_samples is a static argument of the compiled step: a value used by no other
    # test forces a fresh trace, so the patched estimator is the one traced.
    s = channel_scores("hessian", model.apply, variables, masks, batch, key=jax.random.key(0), hessian_samples=1)
    for (n, c), e in exact.items():
        np.testing.assert_allclose(s[n]["kernel"][c], e, rtol=1e-4, atol=1e-9)


def test_hessian_hutchinson_within_its_variance(tiny):
    model, variables, masks, batch, h, wflat, channels = tiny
    samples = 4096  # the tiny model's off-diagonal curvature is large: many probes to be informative
    s = channel_scores("hessian", model.apply, variables, masks, batch, key=jax.random.key(3), hessian_samples=samples)
    bounds = {}
    for (n, c), ind in channels.items():
        a = np.where(ind, 0.5 * wflat**2, 0.0)
        exact = np.sum(a * np.diag(h))
        # Per probe the score is v^T B v with B = diag(a) H: variance 2 sum_{i!=j} sym(B)_ij^2.
        bs = (a[:, None] * h + (a[:, None] * h).T) / 2
        sigma = np.sqrt(2 * (np.sum(bs**2) - np.sum(np.diag(bs) ** 2)) / samples)
        assert abs(float(s[n]["kernel"][c]) - exact) <= 4 * sigma + 1e-6 * abs(exact) + 1e-9, (n, c)
        bounds[(n, c)] = (exact, 4 * sigma)
    # Not vacuous: for the top channel the bound excludes 0 (an estimator returning 0 fails).
    exact, bound = max(bounds.values())
    assert bound < exact
    again = channel_scores("hessian", model.apply, variables, masks, batch, key=jax.random.key(3), hessian_samples=samples)
    np.testing.assert_array_equal(s["conv2"]["kernel"], again["conv2"]["kernel"])


def test_unhashable_apply_fn(toy):
    model, variables, masks, batch = toy

    class Apply:  # defines __eq__ without __hash__: cannot be a static jit argument
        def __eq__(self, other):
            return self is other

        def __call__(self, variables, x, train=False):
            return model.apply(variables, x, train=train)

    a = channel_scores("l2", Apply(), variables, masks, batch)
    b = channel_scores("l2", model.apply, variables, masks, batch)
    np.testing.assert_allclose(a["conv2"]["kernel"], b["conv2"]["kernel"], rtol=1e-6)
