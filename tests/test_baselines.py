"""The baselines' defining properties: slimming's L1 on the BatchNorm scales, SSL's group
lasso gradient, GReg's growing lambda (and its resume), DepGraph's coupled removal."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsst_jax import masks as masks_lib
from rsst_jax import methods, regularizers, rounds
from rsst_jax.compact import compact
from rsst_jax import engine as engine_lib
from rsst_jax.engine import Engine
from rsst_jax.methods import greg, group, slimming, ssl

from tiny import quiet_run, tiny_config, tiny_digits, use_tiny_data


def _tiny_engine(tmp_path, struct, **kw):
    cfg = tiny_config(tmp_path / struct, struct=struct, **kw)
    return cfg, Engine([cfg], dataset=tiny_digits(64))


def _values(cfg, eng, state, masks, round_idx=0):
    return methods.TicketValues(cfg=cfg, net=eng.net, round=round_idx, epoch=cfg.optim.epochs,
                                variables=state.variables, masks=masks)


# --------------------------------------------------------------------------- SSL

def test_ssl_penalty_gradient_is_lambda_w_over_the_channel_group_norm(tmp_path):
    """Every entry of a live channel's group (its kernel slice, BatchNorm scale and bias)
    gets lambda * w / ||w_g||, against a numpy reference; dead entries and other leaves
    get nothing."""
    cfg, eng = _tiny_engine(tmp_path, "ssl", ssl_lambda=0.3)
    params = eng.fresh_state(0).params
    params = jax.tree_util.tree_map(  # BatchNorm scales and biases that are not 1 and 0
        lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params)
    masks = rounds.initial_masks(eng.net, params, cfg.prune)
    masks["conv2"]["kernel"] = masks["conv2"]["kernel"].at[..., 5].set(False)  # a dead channel
    plan = eng.plan(cfg, masks)
    ids = plan.step.targets
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    tx = regularizers.group_lasso(0.3)
    grads, _ = tx.update(zero, tx.init(params), params, reg_targets=ids)
    for conv, bn in (("conv2", "bn2"), ("conv3", "bn3")):
        w = np.asarray(params[conv]["kernel"], np.float64)
        alive = np.asarray(plan.step.masks[conv]["kernel"])
        gamma, beta = (np.asarray(params[bn][k], np.float64) for k in ("scale", "bias"))
        live_c = alive.reshape(-1, w.shape[-1]).any(0)
        norm = np.sqrt((np.where(alive, w, 0) ** 2).reshape(-1, w.shape[-1]).sum(0)
                       + np.where(live_c, gamma ** 2 + beta ** 2, 0))
        norm = np.where(norm > 0, norm, 1.0)  # the dead channel: masked out below
        want = np.where(alive, 0.3 * w / norm, 0.0)
        np.testing.assert_allclose(np.asarray(grads[conv]["kernel"]), want, rtol=1e-5,
                                   atol=1e-7)
        np.testing.assert_allclose(np.asarray(grads[bn]["scale"]),
                                   np.where(live_c, 0.3 * gamma / norm, 0), rtol=1e-5, atol=1e-7)
    assert not np.asarray(grads["conv2"]["kernel"])[..., 5].any()
    assert not np.asarray(grads["fc"]["kernel"]).any()  # not prunable: no group
    # The round's end ranks by the same norms: ssl.channel_norms.
    norms = ssl.channel_norms(masks, params, ids)
    gamma = np.asarray(params["bn3"]["scale"], np.float64)
    beta = np.asarray(params["bn3"]["bias"], np.float64)
    w = np.asarray(params["conv3"]["kernel"], np.float64).reshape(-1, gamma.size)
    np.testing.assert_allclose(norms["conv3/kernel"], np.sqrt((w ** 2).sum(0) + gamma ** 2
                                                              + beta ** 2), rtol=1e-9)
    assert norms["conv2/kernel"][5] == 0


# --------------------------------------------------------------------------- slimming

def test_slimming_penalizes_live_scales_and_removes_the_smallest_over_the_network(tmp_path):
    cfg, eng = _tiny_engine(tmp_path, "slimming", slim_lambda=0.25, rate=0.3)
    state = eng.fresh_state(0)
    scales = {"bn1": [0.9, 0.05, 1.0, 0.7, 0.01, 0.8, 0.6, 0.5],
              "bn2": np.linspace(0.2, 1.2, 12).tolist(), "bn3": np.linspace(0.3, 1.3, 16)}
    params = dict(state.params)
    for bn, v in scales.items():
        params[bn] = dict(params[bn], scale=-jnp.asarray(v, jnp.float32))  # |gamma| counts
    masks = rounds.initial_masks(eng.net, params, cfg.prune)  # conv2, conv3 (conv1: stem)
    plan = eng.plan(cfg, masks)
    tx = slimming.l1_penalty(0.25)
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    grads, _ = tx.update(zero, tx.init(params), params, reg_targets=plan.step.targets)
    np.testing.assert_array_equal(np.asarray(grads["bn2"]["scale"]), -0.25)  # sign(gamma) < 0
    assert not np.asarray(grads["bn2"]["bias"]).any() and not np.asarray(grads["bn1"]["scale"]).any()
    nxt, s = methods.get_method("slimming").next_masks(
        _values(cfg, eng, state.replace(params=params), masks), None)
    assert s is None
    live = masks_lib.live_channels(nxt)
    # round(0.3 * 28) = 8 of the 28 prunable channels go: the 8 smallest |gamma| of bn2, bn3
    pool = sorted([(abs(v), "conv2/kernel", c) for c, v in enumerate(scales["bn2"])]
                  + [(abs(v), "conv3/kernel", c) for c, v in enumerate(scales["bn3"])])
    for _, path, c in pool[:8]:
        assert not live[path][c]
    assert sum(int((~v).sum()) for v in live.values()) == 8
    assert live["conv2/kernel"].any() and live["conv3/kernel"].any()


def test_remove_units_never_empties_a_layer():
    m = {"a": {"kernel": jnp.ones((3, 2), bool)}, "b": {"kernel": jnp.ones((3, 3), bool)}}
    out = masks_lib.remove_channels(m, {"a/kernel": [0.1, 0.2], "b/kernel": [5, 6, 7]}, 0.6)
    live = masks_lib.live_channels(out)
    # round(0.6 * 5) = 3: a's channel 0, then a's 1 is skipped (the last), then b's 0 and 1
    assert live["a/kernel"].tolist() == [False, True]
    assert live["b/kernel"].tolist() == [False, False, True]


# --------------------------------------------------------------------------- GReg

def test_greg_lambda_grows_by_delta_every_interval_up_to_the_ceiling():
    tx = greg.growing_l2(delta=0.3, interval=3, ceiling=1.0)
    params = {"k": jnp.full((2, 4), 2.0), "b": jnp.ones((4,))}
    targets = {"k": jnp.asarray([[True, False, True, False]] * 2), "b": None}
    state = tx.init(params)
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    for t in range(14):
        grads, state = tx.update(zero, state, params, reg_targets=targets)
        want = min(1.0, 0.3 * (t // 3 + 1))
        np.testing.assert_allclose(np.asarray(state.lam["k"]), [want, 0, want, 0], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(grads["k"]), [[2 * want, 0, 2 * want, 0]] * 2,
                                   rtol=1e-6)
        assert not np.asarray(state.lam["b"]).any() and not np.asarray(grads["b"]).any()
    assert int(state.count) == 14


@pytest.mark.slow
def test_greg_resumed_mid_round_continues_its_lambda_exactly(tmp_path, monkeypatch):
    """The per-channel lambda is the method's checkpointed state: a run stopped in the
    middle of a penalized round and resumed logs the lambda and numbers of a run that was
    never stopped."""
    from rsst_jax import callbacks
    use_tiny_data(monkeypatch)
    kw = dict(struct="greg", pruning_times=2, epochs=3, rate=0.3, greg_delta=0.05,
              greg_interval=2)
    quiet_run(tiny_config(tmp_path / "whole", **kw))
    monkeypatch.setenv("RSST_JAX_STOP_AFTER", "5")  # round 1 after its first epoch
    with pytest.raises(callbacks.Interrupted):
        quiet_run(tiny_config(tmp_path / "stopped", **kw))
    monkeypatch.delenv("RSST_JAX_STOP_AFTER")
    quiet_run(tiny_config(tmp_path / "stopped", resume=True, **kw))

    def read(name):
        log = [json.loads(x) for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        rows = json.loads((tmp_path / name / "summary.json").read_text())
        drop = ("time_s", "bn_time_s", "round_time_s", "wall_time_s")
        return ([{k: v for k, v in r.items() if k not in drop} for r in log],
                [{k: v for k, v in r.items() if k not in drop} for r in rows])
    assert read("stopped") == read("whole")
    log = read("whole")[0]
    lam = [r["greg_lambda"] for r in log if r["round"] == 1]
    steps = 320 // 64  # per epoch
    assert lam == pytest.approx([min(1.0, 0.05 * ((e * steps - 1) // 2 + 1)) for e in (1, 2, 3)])
    assert "acc_before_s" in read("whole")[1][1]


# --------------------------------------------------------------------------- DepGraph

def _res20s_round(tmp_path, struct):
    """Masks of ``struct``'s next round on res20s (random weights) and its compaction."""
    ds = tiny_digits(64)
    cfg = tiny_config(tmp_path / struct, struct=struct, arch="res20s", rate=0.5,
                      criteria="magnitude")
    eng = Engine([cfg], dataset=ds)
    state = eng.fresh_state(0)
    state = state.replace(params=jax.tree_util.tree_map(  # trained-like, distinct norms
        lambda p: p * (1 + jax.random.uniform(jax.random.PRNGKey(p.size), p.shape)),
        state.params))
    masks = rounds.initial_masks(eng.net, state.params, cfg.prune)
    scoring = methods.Scoring(batches=lambda: engine_lib.score_batches(eng, 0, 0, 1),
                              key=jax.random.PRNGKey(0), mean=ds.mean, std=ds.std)
    nxt, _ = methods.get_method(struct).next_masks(_values(cfg, eng, state, masks), scoring)
    plan = eng.plan(cfg, nxt)  # --mask_bn: the removed channels' BatchNorm is masked too
    params = masks_lib.apply_masks(state.params, plan.step.masks)
    _, _, desc = compact(eng.model, {"params": params, "batch_stats": state.batch_stats}, nxt,
                         sample_shape=ds.image_shape)
    return nxt, desc


@pytest.mark.slow
def test_a_group_round_on_res20s_removes_for_real_every_channel_its_masks_remove(tmp_path):
    """DepGraph's units are whole residual-stream channels: compaction removes every
    channel the masks drop (none stays behind as 'shared'); Refill at the same rate
    leaves some in the residual streams, which is what the method is for."""
    nxt, desc = _res20s_round(tmp_path, "group")
    dropped = sum(int((~live).sum()) for live in masks_lib.live_channels(nxt).values())
    assert dropped > 100
    assert desc["pruned_channels_kept"] == 0
    assert desc["prunable_channels"] - desc["prunable_channels_kept"] == dropped
    _, refill = _res20s_round(tmp_path, "refill")
    assert refill["pruned_channels_kept"] > 0
    assert refill["pruned_channels_kept_why"].get("shared", 0) > 0


def test_group_units_couple_the_writers_of_a_residual_stream(tmp_path):
    """res20s option A: a stage-2 padding channel of the stream is one unit written by the
    three conv2 of stage 2 and the three of stage 3; the stem's stream (stage 1) is not a
    unit while the stem is not prunable."""
    ds = tiny_digits(64)
    cfg = tiny_config(tmp_path / "g", struct="group", arch="res20s")
    eng = Engine([cfg], dataset=ds)
    state = eng.fresh_state(0)
    masks = rounds.initial_masks(eng.net, state.params, cfg.prune)
    units = group.coupled_units(eng.net, state.variables, masks)
    layers = [sorted({p for p, _ in members}) for _, members in units]
    assert ["layer1_0/conv1/kernel"] in layers           # a plain channel: one writer
    assert not any("layer1_0/conv2/kernel" in ls for ls in layers)  # the stem writes there
    stream = [ls for ls in layers if "layer2_0/conv2/kernel" in ls]
    assert stream and all(len(ls) == 6 for ls in stream)  # stage 2's and stage 3's conv2s
    assert all(any(p.startswith("layer3_") for p in ls) for ls in stream)
    # every prunable output channel is in at most one unit
    seen = [m for _, members in units for m in members]
    assert len(seen) == len(set(seen))
