"""Where the reference was right (issue 14): channel scores of the trained weights before
the round's prune, and which pruned channels --mask_bn makes removable."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsst_jax import config as config_lib
from rsst_jax import counting, nets, rounds
from rsst_jax import checkpoint as ckpt

from tiny import TinyCNN, quiet_run, tiny_config, use_tiny_data


def _variables(seed=0):
    model = TinyCNN(10)
    return model, model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8, 8, 1)), train=False)


@pytest.mark.parametrize("after", [False, True])
def test_channel_scores_read_the_trained_weights_before_the_prune(after):
    """magnitude: sum |w| of each output channel of the kernel as trained (the reference's
    kept trained weights hold the unmasked values); remain: the new mask's count. With
    --score_after_prune the pruned kernel is scored instead."""
    model, variables = _variables()
    net = rounds.Network(model, (8, 8, 1))
    cfg = config_lib.Config.from_dict(dict(criteria="magnitude", score_after_prune=after))
    before = rounds.initial_masks(net, variables["params"], cfg.prune)
    w = np.asarray(variables["params"]["conv2"]["kernel"])
    new = jax.tree_util.tree_map(lambda m: m, before, is_leaf=lambda x: x is None)
    cut = np.abs(w) > np.median(np.abs(w))  # keep the larger half of conv2
    new["conv2"]["kernel"] = jnp.asarray(cut)
    scores = rounds.score_channels(net, variables, before, new, cfg.prune, [], key=None,
                                   mean=(0.5,), std=(0.25,))
    kept = cut if after else np.ones_like(cut)
    np.testing.assert_allclose(np.asarray(scores["conv2"]["kernel"]),
                               np.abs(w * kept).reshape(-1, w.shape[-1]).sum(0), rtol=1e-6)
    remain = rounds.score_channels(net, variables, before, new, cfg.prune.__class__(
        criteria="remain"), [], key=None, mean=(0.5,), std=(0.25,))
    np.testing.assert_array_equal(np.asarray(remain["conv2"]["kernel"]),
                                  cut.reshape(-1, w.shape[-1]).sum(0))


@pytest.mark.slow
def test_mask_bn_leaves_only_residual_stream_channels_kept(tmp_path, monkeypatch, capsys):
    """An RSST ticket of a narrow CIFAR ResNet: with --mask_bn (the default) no pruned
    channel stays for its BatchNorm, the ones that stay share a residual stream with a
    live layer; without it, BatchNorm constants keep more."""
    from rsst_jax.nets.resnet_cifar import ResNetCifar
    monkeypatch.setitem(nets._REGISTRY, "res8s_test", lambda num_classes, **kw: ResNetCifar(
        num_blocks=(1, 1, 1), widths=(8, 16, 32), num_classes=num_classes, **kw))
    use_tiny_data(monkeypatch)
    why = {}
    for mask_bn in (None, False):
        cfg = tiny_config(tmp_path / str(mask_bn), arch="res8s_test", struct="rsst",
                          pruning_times=3, rate=0.5, epochs=1, mask_bn=mask_bn)
        _, run = quiet_run(cfg)
        tree, _ = ckpt.restore_raw(tmp_path / str(mask_bn) / "round_2" / "final")
        stats = counting.compact_stats(run.engine.model, {"params": tree["params"],
                                                          "batch_stats": tree["batch_stats"]},
                                       tree["masks"], run.engine.ds.image_shape)
        why[mask_bn] = stats["pruned_channels_kept_why"]
        assert sum(why[mask_bn].values()) == stats["pruned_channels_kept"]
    assert "constant" not in why[None] and why[None].get("shared", 0) > 0
    assert why[False].get("constant", 0) > 0
    # and experiments.analyze says so
    from experiments import analyze
    for mask_bn, says, not_says in ((None, "share a residual stream", "BatchNorm adds"),
                                    (False, "BatchNorm adds a constant", "")):
        capsys.readouterr()
        assert analyze.main([str(tmp_path / str(mask_bn))]) == 0
        out = capsys.readouterr().out
        line = next(x for x in out.splitlines() if "pruned channels stay" in x)
        assert says in line and (not not_says or not_says not in line), line


@pytest.mark.slow
def test_one_epoch_convention_in_every_output(tmp_path, monkeypatch):
    """Epochs count from 1 on the screen, in log.jsonl, in summary.json's best_val_epoch,
    in round_<r>/best's step and in the round line; rounds count from 0 everywhere."""
    from rsst_jax import driver, runs
    use_tiny_data(monkeypatch)
    lines = []
    cfg = tiny_config(tmp_path / "run", struct="rsst", criteria="magnitude", pruning_times=2,
                      epochs=3, rate=0.5)
    rows = driver.run(cfg, progress=True, log=lines.append)[0]
    log = runs.read_log(tmp_path / "run" / "log.jsonl")
    assert [(r["round"], r["epoch"]) for r in log] == [(r, e) for r in (0, 1) for e in (1, 2, 3)]
    screen = [x for x in lines if " epoch " in x and x.startswith("round ")]
    assert [x.split(":")[0] for x in screen] == [f"round {r} epoch {e}/3" for r in (0, 1)
                                                  for e in (1, 2, 3)]
    for r, row in enumerate(rows):
        best = max((x for x in log if x["round"] == r), key=lambda x: (x["val_acc"], -x["epoch"]))
        assert row["best_val_epoch"] == best["epoch"] and 1 <= best["epoch"] <= 3
        assert ckpt.latest_step(tmp_path / "run" / f"round_{r}" / "best") == best["epoch"]
        line = next(x for x in lines if x.startswith(f"round {r}:"))
        assert f"(epoch {best['epoch']})" in line
