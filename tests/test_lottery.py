"""The iterative procedure end to end on a tiny network: IMP, Refill, RSST, rewinding, resume."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from rsst_jax import checkpoint as ckpt
from rsst_jax import driver
from rsst_jax import engine as engine_lib
from rsst_jax import masks as masks_lib
from rsst_jax import methods

from tiny import quiet_run, tiny_config, use_tiny_data

pytestmark = pytest.mark.slow


def _final(save_dir, r):
    tree, meta = ckpt.restore_raw(save_dir / f"round_{r}" / "final")
    return tree, meta


def _np_masks(masks):
    return jax.tree_util.tree_map(lambda m: None if m is None else np.asarray(m, bool), masks,
                                  is_leaf=lambda x: x is None)


def _mask_leaves(masks):
    return [np.asarray(m, bool) for m in jax.tree_util.tree_leaves(masks)]


def _kernels_and_masks(tree):
    """(path, kernel, mask) for every prunable leaf of a restored checkpoint tree."""
    out = []
    flat_p = dict(zip(masks_lib.tree_paths(tree["params"]), jax.tree_util.tree_leaves(tree["params"])))
    masks = tree["masks"]
    for path, m in zip(masks_lib.tree_paths(masks),
                       jax.tree_util.tree_leaves(masks, is_leaf=lambda x: x is None)):
        if m is not None and np.ndim(m) > 0:
            out.append((path, np.asarray(flat_p[path]), np.asarray(m, bool)))
    return out


def test_imp_density_follows_rate_and_pruned_weights_stay_zero(tmp_path, monkeypatch):
    use_tiny_data(monkeypatch)
    cfg = tiny_config(tmp_path / "imp", struct="none", pruning_times=4, rate=0.2)
    rows, run = quiet_run(cfg)
    total = sum(m.size for m in _mask_leaves(masks_lib.init_masks(
        run.engine.fresh_state(0).params)))
    kept = total
    for r, row in enumerate(rows):
        tree, _ = _final(tmp_path / "imp", r)
        leaves = _kernels_and_masks(tree)
        n_kept = sum(int(m.sum()) for _, _, m in leaves)
        assert n_kept == kept, f"round {r}: {n_kept} kept, expected {kept}"
        assert row["remaining_weight_pct"] == pytest.approx(100.0 * kept / total)
        assert abs(kept / total - 0.8 ** r) <= r / total
        for path, w, m in leaves:  # masked weights are exactly 0 after training
            assert np.all(w[~m] == 0.0), path
        kept -= int(np.round(0.2 * kept))
    # one compiled train program served every round
    assert run.engine.step_traces == 1


def test_refill_rounds_are_channelwise_with_spec_k(tmp_path, monkeypatch):
    use_tiny_data(monkeypatch)
    cfg = tiny_config(tmp_path / "refill", struct="refill", criteria="l1", pruning_times=3,
                      rate=0.3, fillback_rate=0.25)
    _, run = quiet_run(cfg)
    for r in (1, 2):
        tree, _ = _final(tmp_path / "refill", r)
        for path, w, m in _kernels_and_masks(tree):
            per_channel = m.reshape(-1, m.shape[-1])
            assert np.all(per_channel.all(0) | ~per_channel.any(0)), path
            assert np.all(w[~m] == 0.0)
    # k per layer: recompute the plan from round 1's trained weights with the run's functions
    tree, _ = _final(tmp_path / "refill", 1)
    variables = {"params": tree["params"], "batch_stats": tree["batch_stats"]}
    masks = _np_masks(tree["masks"])
    pruned = masks_lib.magnitude_prune(variables["params"], masks, 0.3)
    eng = run.engine
    m_next, _ = eng.method.next_masks(
        methods.TicketValues(cfg=cfg, net=eng.net, round=1, epoch=cfg.optim.epochs,
                             variables=variables, masks=masks),
        methods.Scoring(batches=lambda: engine_lib.score_batches(eng, 0, 1, 1), key=jax.random.PRNGKey(0),
                        mean=eng.ds.mean, std=eng.ds.std))
    plan = eng.plan(cfg, m_next)
    for (path, _, m_imp), (_, _, m_s) in zip(
            _kernels_and_masks({"params": variables["params"], "masks": pruned}),
            _kernels_and_masks({"params": variables["params"], "masks": plan.masks})):
        c = m_imp.shape[-1]
        f = m_imp.size // c
        n = m_imp.sum() / f
        k = max(1, int(n + (c - n) * 0.25))
        assert int(m_s.reshape(-1, c).all(0).sum()) == k, path


def test_rsst_penalty_shrinks_targets_and_applies_channel_mask(tmp_path, monkeypatch):
    use_tiny_data(monkeypatch)
    cfg = tiny_config(tmp_path / "rsst", struct="rsst", criteria="magnitude", pruning_times=2,
                      rate=0.5, epochs=3, RST_schedule="x", reg_granularity_prune=1.0,
                      update_reg_interval=1)
    rows, run = quiet_run(cfg)
    log = [json.loads(line) for line in (tmp_path / "rsst" / "log.jsonl").read_text().splitlines()]
    round1 = [row for row in log if row["round"] == 1]
    assert len(round1) == 3 and round1[0]["target_count"] > 0
    assert round1[-1]["target_norm_rel"] <= 0.1
    assert round1[-1]["reg_lambda"] == pytest.approx(3 * run.engine.steps_per_epoch)
    assert "acc_before_s" in rows[1] and "acc_after_s" in rows[1]
    tree, _ = _final(tmp_path / "rsst", 1)
    for path, w, m in _kernels_and_masks(tree):  # S applied: channel-wise and zero outside
        per_channel = m.reshape(-1, m.shape[-1])
        assert np.all(per_channel.all(0) | ~per_channel.any(0)), path
        assert np.all(w[~m] == 0.0)
    assert rows[1]["channel_sparsity_pct"] > 0
    # --mask_bn (default for rsst): a removed channel's BatchNorm scale and bias are exactly 0,
    # so the channel outputs exactly 0; and they were penalized with the kernel weights.
    dead_total = 0
    for i in (2, 3):
        m = np.asarray(tree["masks"][f"conv{i}"]["kernel"], bool)
        dead = ~m.reshape(-1, m.shape[-1]).any(0)
        dead_total += int(dead.sum())
        for leaf in ("scale", "bias"):
            assert np.all(np.asarray(tree["params"][f"bn{i}"][leaf])[dead] == 0.0)
    assert dead_total > 0
    # The plan's targets: kernel entries kept by M and removed by S, plus the BatchNorm
    # entries of the channels S removes.
    eng = run.engine
    params = eng.fresh_state(0).params
    m = masks_lib.init_masks(params)
    s = jax.tree_util.tree_map(lambda x: x, m, is_leaf=lambda x: x is None)
    s["conv2"]["kernel"] = s["conv2"]["kernel"].at[..., 3].set(False)
    plan = eng.plan(cfg, m, s)
    t = plan.step.targets
    assert np.asarray(t["conv2"]["kernel"]).sum() == 3 * 3 * 8
    assert np.flatnonzero(np.asarray(t["bn2"]["scale"])).tolist() == [3]
    assert np.flatnonzero(np.asarray(t["bn2"]["bias"])).tolist() == [3]
    assert not np.asarray(t["bn3"]["scale"]).any() and t["fc"]["kernel"] is None


def test_rsst_targets_untouched_by_penalty_when_lambda_is_zero(tmp_path, monkeypatch):
    """Same seed, g=0: the RSST round must equal plain IMP training with the same mask."""
    use_tiny_data(monkeypatch)
    a = tiny_config(tmp_path / "a", struct="rsst", criteria="magnitude", pruning_times=2,
                    reg_granularity_prune=0.0)
    quiet_run(a)[0]
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert all(row["reg_lambda"] == 0.0 for row in log if row["round"] == 1)
    assert log[-1]["target_norm_rel"] > 0.5


@pytest.mark.parametrize("prune_type", ["lt", "rewind_lt"])
def test_rewinding_restores_saved_weights_bit_for_bit(tmp_path, monkeypatch, prune_type):
    use_tiny_data(monkeypatch)
    save = tmp_path / prune_type
    cfg = tiny_config(save, struct="none", pruning_times=2, prune_type=prune_type,
                      rewind_epoch=1, epochs=2)
    monkeypatch.setenv("RSST_JAX_STOP_AFTER", "1")
    with pytest.raises(SystemExit):
        quiet_run(cfg)[0]
    after_epoch1, _ = ckpt.restore_raw(save / "checkpoints")
    # Resume and stop again right after the checkpoint that opens round 1.
    monkeypatch.setenv("RSST_JAX_STOP_AFTER", "2")
    with pytest.raises(SystemExit):
        quiet_run(cfg.replace(resume=True))[0]
    if prune_type == "lt":
        expected, _ = ckpt.restore_raw(save / "init")
    else:
        expected = {"params": after_epoch1["state"]["params"],
                    "batch_stats": after_epoch1["state"]["batch_stats"]}
    # The checkpoint written at the start of round 1 holds the rewound state.
    start_r1, meta = ckpt.restore_raw(save / "checkpoints", step=1 * (cfg.optim.epochs + 1) + 0)
    assert meta["round"] == 1 and meta["epoch"] == 0
    masks = start_r1["masks"]
    for a, b in zip(jax.tree_util.tree_leaves(start_r1["rewind"]),
                    jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(a, b)
    want = masks_lib.apply_masks(expected["params"], _np_masks(masks))
    for a, b in zip(jax.tree_util.tree_leaves(start_r1["state"]["params"]),
                    jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(a, np.asarray(b))
    for a, b in zip(jax.tree_util.tree_leaves(start_r1["state"]["batch_stats"]),
                    jax.tree_util.tree_leaves(expected["batch_stats"])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("stop_after", [2, 4])
def test_resume_reproduces_uninterrupted_summary(tmp_path, monkeypatch, stop_after):
    use_tiny_data(monkeypatch)
    kw = dict(struct="rsst", criteria="l1", pruning_times=3, epochs=2)
    full = tiny_config(tmp_path / "full", **kw)
    quiet_run(full)[0]
    part = tiny_config(tmp_path / "part", **kw)
    monkeypatch.setenv("RSST_JAX_STOP_AFTER", str(stop_after))
    with pytest.raises(SystemExit):
        quiet_run(part)[0]
    monkeypatch.delenv("RSST_JAX_STOP_AFTER")
    quiet_run(part.replace(resume=True))[0]

    def strip(rows):
        return [{k: v for k, v in row.items() if "time" not in k} for row in rows]

    a = json.loads((tmp_path / "full" / "summary.json").read_text())
    b = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert len(a) == 3 and strip(a) == strip(b)
    la = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert strip(la) == strip(lb)


def test_resume_refuses_other_config_and_fresh_run_refuses_existing_dir(tmp_path, monkeypatch):
    use_tiny_data(monkeypatch)
    cfg = tiny_config(tmp_path / "r", pruning_times=1, epochs=1)
    quiet_run(cfg)[0]
    before = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    with pytest.raises(driver.RunError, match="already holds a run"):
        quiet_run(cfg)[0]
    with pytest.raises(driver.RunError, match="--lr 0.1 .now 0.05"):
        quiet_run(cfg.replace(resume=True, lr=0.05))[0]
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == before
    # A finished run resumes to the same rows without training again.
    rows = quiet_run(cfg.replace(resume=True))[0]
    assert len(rows) == 1


def test_pt_rewinds_to_pretrained_weights_and_rejects_mismatched_files(tmp_path, monkeypatch):
    use_tiny_data(monkeypatch)
    donor = tiny_config(tmp_path / "donor", pruning_times=1, epochs=1)
    quiet_run(donor)[0]
    cfg = tiny_config(tmp_path / "pt", prune_type="pt", pretrained=str(tmp_path / "donor"),
                      pruning_times=2, epochs=1)
    quiet_run(cfg)[0]
    w_pre, _ = ckpt.restore_raw(tmp_path / "donor" / "round_0" / "final")
    w0, _ = ckpt.restore_raw(tmp_path / "pt" / "init")
    last, _ = ckpt.restore_raw(tmp_path / "pt" / "checkpoints")
    fresh = {"conv1/kernel", "fc/kernel", "fc/bias"}  # the stem and the classifier
    got = masks_lib.flat_dict(last["rewind"]["params"])
    pre, init = masks_lib.flat_dict(w_pre["params"]), masks_lib.flat_dict(w0["params"])
    assert fresh <= set(got)
    for path, value in got.items():  # as the reference: stem and classifier freshly initialized
        np.testing.assert_array_equal(value, (init if path in fresh else pre)[path])
        assert path in fresh or not np.array_equal(value, init[path])
    # A checkpoint of another architecture stops with a message naming the layer.
    other = tiny_config(tmp_path / "other", arch="res20s", pruning_times=1, epochs=1,
                        batch_size=32)
    with pytest.raises(driver.RunError):
        quiet_run(other.replace(prune_type="pt", pretrained=str(tmp_path / "donor")))


def test_fc_flag_prunes_nothing_and_prune_fc_prunes_the_classifier(tmp_path, monkeypatch):
    """--fc is the reference's "rewind fc" (every layer is rewound here): the classifier
    stays whole; --prune_fc adds it to the prunable kernels."""
    use_tiny_data(monkeypatch)
    kw = dict(struct="none", pruning_times=2, epochs=1, rate=0.5)
    quiet_run(tiny_config(tmp_path / "fc", fc=True, **kw))
    quiet_run(tiny_config(tmp_path / "prune_fc", prune_fc=True, **kw))
    a, _ = _final(tmp_path / "fc", 1)
    b, _ = _final(tmp_path / "prune_fc", 1)
    assert a["masks"]["fc"]["kernel"] is None or np.asarray(a["masks"]["fc"]["kernel"]).all()
    fc = np.asarray(b["masks"]["fc"]["kernel"], bool)
    assert 0 < fc.sum() < fc.size


def test_predicted_and_measured_penalized_norm_agree(tmp_path, monkeypatch):
    """The start-up prediction of what the RSST penalty alone leaves of the penalized
    weights' norm: exact with --block_loss_grad (only the penalty and weight decay act on
    them: the same linear recurrence), and within 5 points with the loss gradient on this
    tiny run; both printed in the round line."""
    use_tiny_data(monkeypatch)
    kw = dict(struct="rsst", criteria="magnitude", pruning_times=2, epochs=2, rate=0.5,
              reg_granularity_prune=2.0)
    lines = []
    rows = driver.run(tiny_config(tmp_path / "block", block_loss_grad=True, **kw),
                      progress=False, log=lines.append)[0]
    assert 0.01 < rows[1]["predicted_norm_rel"] < 0.9  # the test means something
    assert rows[1]["target_norm_rel"] == pytest.approx(rows[1]["predicted_norm_rel"], abs=2e-3)
    round_line = [x for x in lines if x.startswith("round 1:")][0]
    assert (f"keep {100 * rows[1]['target_norm_rel']:.1f}% of their norm (predicted "
            f"{100 * rows[1]['predicted_norm_rel']:.1f}%)") in round_line
    assert any(x.startswith("RSST penalty: by the end of each round") for x in lines)
    kept = rows[1]["target_norm_rel"]  # above the 3% budget here: the round warns
    assert f"warning: round 1's penalized weights kept {100 * kept:.1f}% of their norm" in \
        "\n".join(lines)
    rows = quiet_run(tiny_config(tmp_path / "loss", **kw))[0]
    assert abs(rows[1]["target_norm_rel"] - rows[1]["predicted_norm_rel"]) < 0.05


def test_penalty_budget_warns_with_a_granularity_that_fixes_it():
    """The recurrence by hand on a 3-step round, and the suggested g reaching the budget."""
    from rsst_jax import config as config_lib, regularizers, train
    from rsst_jax.methods import rsst
    lr, lam, mom, wd = [0.1, 0.1, 0.05], [1.0, 2.0, 4.0], 0.9, 0.0
    w, v = 1.0, 0.0
    for a, b in zip(lr, lam):
        v = mom * v + b * w
        w -= a * v
    assert regularizers.remaining_norm_fraction(lr, lam, mom, wd) == pytest.approx(abs(w))
    cfg = config_lib.Config.from_dict(dict(epochs=10, decreasing_lr="6,8", lr=0.05, warmup=0,
                                           batch_size=32))
    sched = train.Schedules.of(cfg.optim, 1257 // 32)
    schedule, values = rsst.lambda_schedule(cfg), rsst.penalty_values(cfg)
    frac, warning = regularizers.penalty_report(sched, schedule, values, cfg)
    assert frac > regularizers.PENALTY_BUDGET and "--reg_granularity_prune" in warning
    g = float(warning.split("--reg_granularity_prune ")[1].split()[0])
    fixed = regularizers.predicted_norm_fraction(sched, schedule, dict(values, g=g), cfg.optim)
    assert fixed <= regularizers.SUGGESTION_TARGET
    late = cfg.replace(decreasing_lr="8,9")
    frac, warning = regularizers.penalty_report(
        train.Schedules.of(late.optim, 1257 // 32), schedule, values, late)
    assert frac < regularizers.PENALTY_BUDGET and warning is None
