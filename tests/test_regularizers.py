"""Tests for rsst_jax.regularizers: lambda schedules, the RSST penalty, stability checks."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rsst_jax import regularizers as reg


def reference_lambda(name, T, g, interval, exponents=4.0, upper=None, per_epoch=None):
    """float64 numpy transcription of the docs/SPEC.md table (section 2), steps 0 .. T-1."""
    t = np.arange(T, dtype=np.float64)
    u = np.floor((t + 1) / interval)
    p = (np.mod(t, per_epoch) + 1) / per_epoch if per_epoch else (t + 1) / T
    lam = {
        "x": g * u,
        "x^2": (g * u) ** 2,
        "x^3": (g * u) ** 3,
        "exp": np.exp(g * u),
        "exp_custom": g / (math.e - 1) * (np.exp(p) - 1),
        "exp_custom_exponents": g / (math.e - 1) * (np.exp(p ** exponents) - 1),
    }[name]
    return lam if upper is None else np.minimum(lam, upper)


COMBOS = [  # (T, g, update_interval, steps_per_epoch)
    (1, 0.7, None, None),
    (10, 0.5, 1, None),
    (37, 0.1, 5, None),
    (100, 2.0, None, None),
    (60, 0.3, None, 12),
]


@pytest.mark.parametrize("name", reg.SCHEDULES)
@pytest.mark.parametrize("T,g,interval,spe", COMBOS)
def test_schedule_matches_numpy_reference(name, T, g, interval, spe):
    sched = reg.lambda_schedule(name, total_steps=T, granularity=g, update_interval=interval,
                                steps_per_epoch=spe)
    expected_interval = interval or spe or T
    assert sched.update_interval == expected_interval
    got = np.asarray(jax.jit(sched)(jnp.arange(T)))
    assert got.dtype == np.float32 and got.shape == (T,)
    want = reference_lambda(name, T, g, expected_interval)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
    assert reg.max_lambda(sched, T) == pytest.approx(want.max(), rel=2e-6)
    if name.startswith("exp_custom"):
        assert got[-1] == np.float32(g) and reg.max_lambda(sched, T) == float(np.float32(g))
    # A Python int step and a traced scalar step give the same value (to an ulp: XLA
    # may vectorize exp and fuse multiplies differently for arrays and scalars).
    np.testing.assert_allclose(float(sched(T - 1)), got[-1], rtol=1e-6)
    np.testing.assert_allclose(float(jax.jit(sched)(jnp.int32(T // 2))), got[T // 2], rtol=1e-6)


def test_exp_counts_updates():
    sched = reg.lambda_schedule("exp", total_steps=20, granularity=0.5, update_interval=5)
    got = np.asarray(sched(jnp.arange(20)))
    # u = 0 for t < 4, then 1 .. 4 at t = 4, 9, 14, 19.
    assert np.unique(got).size == 5
    np.testing.assert_allclose(np.unique(got), np.exp(0.5 * np.arange(5)), rtol=1e-6)
    assert got[3] == 1.0 and got[4] > 1.0 and got[8] == got[4] and got[9] > got[8]


@given(T=st.integers(1, 3000), g=st.floats(1e-6, 1e4), exponents=st.floats(0.2, 8.0),
       name=st.sampled_from(["exp_custom", "exp_custom_exponents"]))
def test_exp_custom_reach_g_exactly_and_are_monotone(T, g, exponents, name):
    sched = reg.lambda_schedule(name, total_steps=T, granularity=g, exponents=exponents)
    # 64 increasing steps ending at T-1: a fixed shape keeps the examples compile-free.
    steps = np.linspace(0, T - 1, 64).astype(np.int32)
    lam = np.asarray(sched(jnp.asarray(steps)))
    assert lam[-1] == np.float32(g)
    assert np.all(np.diff(lam) >= 0)
    assert np.all(lam > 0) and np.all(lam <= np.float32(g))


@pytest.mark.parametrize("name", reg.SCHEDULES)
def test_upper_limit_caps_every_schedule(name):
    T, g, cap = 50, 3.0, 2.5
    sched = reg.lambda_schedule(name, total_steps=T, granularity=g, update_interval=2, upper_limit=cap)
    got = np.asarray(sched(jnp.arange(T)))
    want = reference_lambda(name, T, g, 2, upper=cap)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    assert got.max() == np.float32(cap)  # every uncapped schedule exceeds 2.5 here
    assert reg.max_lambda(sched, T) == cap


def test_exp_overflow_is_capped():
    sched = reg.lambda_schedule("exp", total_steps=200, granularity=1.0, update_interval=1, upper_limit=1e3)
    assert reg.max_lambda(sched, 200) == 1e3
    uncapped = reg.lambda_schedule("exp", total_steps=200, granularity=1.0, update_interval=1)
    assert reg.max_lambda(uncapped, 200) == math.inf


@pytest.mark.parametrize("name", ["exp_custom", "exp_custom_exponents"])
def test_epoch_progress_restarts_each_epoch(name):
    spe, epochs, g = 7, 4, 2.0
    T = spe * epochs
    per_epoch = reg.lambda_schedule(name, total_steps=T, granularity=g, progress="epoch",
                                    steps_per_epoch=spe)
    lam = np.asarray(per_epoch(jnp.arange(T)))
    np.testing.assert_allclose(lam, reference_lambda(name, T, g, spe, per_epoch=spe), rtol=2e-6)
    ramp = lam[:spe]
    np.testing.assert_array_equal(lam.reshape(epochs, spe), np.tile(ramp, (epochs, 1)))
    assert np.all(lam[spe - 1::spe] == np.float32(g))  # g at every epoch's last batch
    assert np.all(lam[spe::spe] < lam[spe - 1:-1:spe])  # and falls at the next epoch
    # Over the round, instead, g is reached once, at the end.
    whole = np.asarray(reg.lambda_schedule(name, total_steps=T, granularity=g)(jnp.arange(T)))
    assert np.flatnonzero(whole == np.float32(g)).tolist() == [T - 1]


def test_steps_past_the_round_hold_the_last_value():
    sched = reg.lambda_schedule("x", total_steps=10, granularity=1.0, update_interval=1)
    assert float(sched(10)) == float(sched(9)) == float(sched(500)) == 10.0
    assert float(sched(-3)) == float(sched(0)) == 1.0


def test_validation_errors():
    with pytest.raises(ValueError, match="exp_custom_exponents") as err:
        reg.lambda_schedule("linear", total_steps=10)
    for name in reg.SCHEDULES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="total_steps"):
        reg.lambda_schedule("x", total_steps=0)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        reg.lambda_schedule("exp_custom", total_steps=10, progress="epoch")
    with pytest.raises(ValueError, match="progress"):
        reg.lambda_schedule("exp_custom", total_steps=10, progress="batch")
    with pytest.raises(ValueError, match="update_interval"):
        reg.lambda_schedule("x", total_steps=10, update_interval=0)
    with pytest.raises(ValueError, match="total_steps"):
        reg.max_lambda(reg.lambda_schedule("x", total_steps=3), 0)


# --- the penalty transformation -------------------------------------------------------

W = np.array([1.0, 2.0, -3.0], np.float32)
G = np.array([0.1, 0.2, 0.3], np.float32)
TARGET = np.array([True, False, True])


def _x_schedule(g=0.5):
    """lambda(t) = g*(t+1): exact in float32 for the small values used here."""
    return reg.lambda_schedule("x", total_steps=100, granularity=g, update_interval=1)


@pytest.mark.parametrize("block", [False, True])
def test_penalty_exact_values_on_three_elements(block):
    tx = reg.rsst_penalty(block_loss_grad=block)
    sched = _x_schedule()
    params = {"w": jnp.asarray(W), "b": jnp.asarray(G)}
    targets = {"w": jnp.asarray(TARGET), "b": None}
    grads = {"w": jnp.asarray(G), "b": jnp.asarray(G)}
    state = tx.init(params)
    assert state.count.dtype == jnp.int32 and state.count.shape == ()
    base = np.zeros(3, np.float32) if block else G
    for step, scale in [(0, 1.0), (1, 0.5), (2, 1.0)]:
        out, state = tx.update(grads, state, params, reg_targets=targets,
                               reg_lambda=sched(step) * jnp.float32(scale))
        lam = np.float32(0.5 * (step + 1) * scale)
        want = np.where(TARGET, base + lam * W, G)
        np.testing.assert_array_equal(np.asarray(out["w"]), want)
        assert np.asarray(out["w"])[1] == G[1]  # the non-target entry is untouched
        np.testing.assert_array_equal(np.asarray(out["b"]), G)  # None leaf untouched
        assert int(state.count) == step + 1


def test_no_targets_is_identity_but_counts():
    tx = reg.rsst_penalty()
    params = {"w": jnp.asarray(W)}
    state = tx.init(params)
    out, state = tx.update({"w": jnp.asarray(G)}, state, params)
    np.testing.assert_array_equal(np.asarray(out["w"]), G)
    assert int(state.count) == 1
    out, state = tx.update({"w": jnp.asarray(G)}, state, params,
                           reg_targets={"w": jnp.zeros(3, bool)}, reg_lambda=1.0,
                           masks="ignored extra arg")
    np.testing.assert_array_equal(np.asarray(out["w"]), G)
    assert int(state.count) == 2


def test_target_shape_is_checked():
    tx = reg.rsst_penalty()
    params = {"w": jnp.asarray(W)}
    with pytest.raises(ValueError, match="bool"):
        tx.update(params, tx.init(params), params, reg_targets={"w": jnp.ones(2, bool)},
                  reg_lambda=1.0)
    with pytest.raises(ValueError, match="bool"):
        tx.update(params, tx.init(params), params, reg_targets={"w": jnp.ones(3)},
                  reg_lambda=1.0)
    with pytest.raises(ValueError, match="reg_lambda"):
        tx.update(params, tx.init(params), params, reg_targets={"w": jnp.ones(3, bool)})


def _quadratic_setup(seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = {"a": {"kernel": jax.random.normal(k1, (4, 8)), "bias": jnp.zeros(8)},
              "b": {"kernel": jax.random.normal(k2, (8, 3))}}
    optimum = jax.tree_util.tree_map(lambda w: w + 1.0, params)
    return params, optimum


def _make_train(tx, schedule, optimum, traces):
    def loss(params):
        sq = jax.tree_util.tree_map(lambda w, o: jnp.sum((w - o) ** 2), params, optimum)
        return 0.5 * sum(jax.tree_util.tree_leaves(sq))

    @jax.jit
    def step(params, opt_state, targets, t, scale):
        traces.append(1)  # runs only while tracing
        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params, reg_targets=targets,
                                       reg_lambda=schedule(t) * scale)
        return optax.apply_updates(params, updates), opt_state

    def train(params, targets, steps, scale=1.0):
        opt_state = tx.init(params)
        for t in range(steps):
            params, opt_state = step(params, opt_state, targets, jnp.int32(t), jnp.float32(scale))
        return params, opt_state

    return train


def _targets(params, rng):
    def leaf(path, w):
        if jax.tree_util.keystr(path).endswith("['kernel']"):
            return jnp.asarray(rng.random(w.shape) < 0.5)
        return None
    return jax.tree_util.tree_map_with_path(leaf, params)


def test_jitted_step_compiles_once_for_different_targets():
    params, optimum = _quadratic_setup()
    tx = optax.chain(reg.rsst_penalty(), optax.sgd(0.1, momentum=0.9))
    traces = []
    train = _make_train(tx, _x_schedule(0.1), optimum, traces)
    rng = np.random.default_rng(0)
    t1, t2 = _targets(params, rng), _targets(params, rng)
    assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in
               zip(jax.tree_util.tree_leaves(t1), jax.tree_util.tree_leaves(t2)))
    p1, _ = train(params, t1, 3)
    p2, _ = train(params, t2, 3, scale=0.5)
    assert len(traces) == 1
    assert not np.allclose(np.asarray(p1["a"]["kernel"]), np.asarray(p2["a"]["kernel"]))


@pytest.mark.parametrize("block", [False, True])
def test_sgd_drives_targets_to_zero_and_leaves_the_rest(block):
    T, lr = 200, 0.1
    sched = reg.lambda_schedule("exp_custom_exponents", total_steps=T, granularity=15.0)
    assert reg.first_unstable_step(sched, lr, 0.0, T) is None  # lr*g = 1.5 < 2
    tx = optax.chain(reg.rsst_penalty(block_loss_grad=block), optax.sgd(lr))
    params, optimum = _quadratic_setup(1)
    targets = _targets(params, np.random.default_rng(1))
    train = _make_train(tx, sched, optimum, [])
    penalized, opt_state = train(params, targets, T)
    plain, _ = train(params, jax.tree_util.tree_map(lambda t: jnp.zeros_like(t), targets), T)

    for key in ["a", "b"]:
        tgt = np.asarray(targets[key]["kernel"])
        w0 = np.asarray(params[key]["kernel"])[tgt]
        w_pen = np.asarray(penalized[key]["kernel"])
        w_plain = np.asarray(plain[key]["kernel"])
        assert np.linalg.norm(w_pen[tgt]) <= 0.1 * np.linalg.norm(w0)
        # The loss is separable, so non-targets follow exactly the unpenalized path.
        np.testing.assert_array_equal(w_pen[~tgt], w_plain[~tgt])
        np.testing.assert_allclose(w_plain, np.asarray(optimum[key]["kernel"]), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(penalized["a"]["bias"]), np.asarray(plain["a"]["bias"]))


# --- stability and adaptive scale ------------------------------------------------------

def test_stability_limit():
    assert reg.stability_limit(0.1, 0.9) == pytest.approx(38.0)
    assert reg.stability_limit(0.5) == 4.0
    assert reg.stability_limit(0.0, 0.9) == math.inf


def test_first_unstable_step_x_with_big_g():
    sched = reg.lambda_schedule("x", total_steps=100, granularity=1.0, update_interval=1)
    # lambda(t) = t+1 crosses 2*(1+0.9)/0.1 = 38 at t = 37.
    assert reg.first_unstable_step(sched, 0.1, 0.9, 100) == 37
    assert reg.first_unstable_step(sched, np.full(100, 0.1), 0.9, 100) == 37
    assert reg.first_unstable_step(sched, 0.01, 0.9, 100) is None  # limit 380
    # A decaying lr: lambda(t) = 2*(t+1) against the cosine schedule.
    steep = reg.lambda_schedule("x", total_steps=100, granularity=2.0, update_interval=1)
    lr_fn = optax.cosine_decay_schedule(0.1, decay_steps=100)
    lam = 2.0 * np.arange(1, 101, dtype=np.float64)
    lrs = np.asarray(jax.vmap(lr_fn)(jnp.arange(100)), np.float64)
    want = int(np.flatnonzero(lrs * lam >= 3.8)[0])
    assert 19 < want < 100  # later than with a constant lr (t = 18)
    assert reg.first_unstable_step(steep, lr_fn, 0.9, 100) == want
    assert reg.first_unstable_step(sched, lr_fn, 0.9, 100) is None
    with pytest.raises(ValueError, match="learning rates"):
        reg.first_unstable_step(sched, np.full(10, 0.1), 0.9, 100)


def test_first_unstable_step_exp_custom_small_g_is_none():
    sched = reg.lambda_schedule("exp_custom_exponents", total_steps=500, granularity=1.0)
    assert reg.first_unstable_step(sched, 0.1, 0.9, 500) is None
    big = reg.lambda_schedule("exp_custom_exponents", total_steps=500, granularity=100.0)
    step = reg.first_unstable_step(big, 0.1, 0.9, 500)
    lam = np.asarray(big(jnp.arange(500)), np.float64)
    assert step is not None and lam[step] * 0.1 >= 3.8 and lam[step - 1] * 0.1 < 3.8


def test_adaptive_scale():
    assert reg.adaptive_scale(0.80, 0.90) == 0.5
    assert reg.adaptive_scale(0.90, 0.90) == 1.0
    assert reg.adaptive_scale(0.95, 0.90) == 1.0
    assert reg.adaptive_scale(None, 0.90) == 1.0
