"""--bn_recalibrate N: BatchNorm running statistics re-estimated over N training batches
before RSST's evaluations, without changing training; exact against a numpy reference."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsst_jax import config as config_lib
from rsst_jax import tickets
from rsst_jax import train as train_lib
from rsst_jax import engine as engine_lib
from rsst_jax.engine import Engine
from tiny import TinyCNN, quiet_run, tiny_config, tiny_digits, use_tiny_data


def test_recalibration_is_the_mean_of_each_batchs_statistics():
    ds = tiny_digits(320)
    model = TinyCNN(10)
    variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 1)), train=False)
    cfg = train_lib.StepConfig(flip=False, mean=tuple(ds.mean), std=tuple(ds.std))
    idx = np.arange(3 * 16, dtype=np.int32).reshape(3, 16)[::-1]  # three batches of 16
    stats = jax.jit(train_lib.make_bn_recalibration(model, cfg))(
        variables, jnp.asarray(ds.train_x), jnp.asarray(idx))
    # numpy reference for bn1: conv1's output per batch, mean and (biased) variance
    kernel = np.asarray(variables["params"]["conv1"]["kernel"], np.float64)
    means, variances = [], []
    for rows in idx:
        x = (ds.train_x[rows].astype(np.float64) / 255.0 - np.asarray(ds.mean)) \
            / np.asarray(ds.std)
        xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = sum(np.einsum("nhwc,co->nhwo", xp[:, i:i + 8, j:j + 8], kernel[i, j])
                  for i in range(3) for j in range(3))
        means.append(out.mean(axis=(0, 1, 2)))
        variances.append(out.var(axis=(0, 1, 2)))
    np.testing.assert_allclose(stats["bn1"]["mean"], np.mean(means, 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["bn1"]["var"], np.mean(variances, 0), rtol=1e-4,
                               atol=1e-5)
    # the weights are only read; the stats of every BatchNorm changed
    assert all(not np.allclose(stats[b]["mean"], variables["batch_stats"][b]["mean"])
               for b in ("bn1", "bn2", "bn3"))


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_with_fresh_statistics_trains_the_same_and_resumes_exactly(tmp_path,
                                                                        monkeypatch):
    use_tiny_data(monkeypatch)
    kw = dict(struct="rsst", criteria="l1", pruning_times=2, epochs=2)
    off = tiny_config(tmp_path / "off", bn_recalibrate=0, **kw)
    on = tiny_config(tmp_path / "on", **kw)  # the default: 128 images, 2 batches of 64
    quiet_run(off)
    quiet_run(on)
    log_off, log_on = _rows(tmp_path / "off" / "log.jsonl"), _rows(tmp_path / "on" / "log.jsonl")
    train_keys = ("train_loss", "train_acc", "lr", "reg_lambda", "target_norm_rel")
    assert [{k: r.get(k) for k in train_keys} for r in log_on] == \
           [{k: r.get(k) for k in train_keys} for r in log_off]  # training is untouched
    assert ["bn_time_s" in r for r in log_on] == [False, False, True, True]  # RSST round only
    assert not any("bn_time_s" in r for r in log_off)
    summary_on = json.loads((tmp_path / "on" / "summary.json").read_text())
    summary_off = json.loads((tmp_path / "off" / "summary.json").read_text())
    assert [r.get("bn_recalibrate") for r in summary_on] == [None, 2]
    assert all("bn_recalibrate" not in r for r in summary_off)
    # The final RSST ticket: same weights, statistics re-estimated from them after S.
    a, b = tickets.load(tmp_path / "off", round_idx=1), tickets.load(tmp_path / "on",
                                                                      round_idx=1)
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(x, y)
    eng = Engine([on])
    stats = jax.jit(train_lib.make_bn_recalibration(eng.model, eng.step_cfg))(
        b.variables, eng.dev["train_x"], jnp.asarray(engine_lib.bn_batches(eng, 2)))
    for x, y in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(b.batch_stats)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert not all(np.array_equal(x, y) for x, y in zip(
        jax.tree_util.tree_leaves(a.batch_stats), jax.tree_util.tree_leaves(b.batch_stats)))
    # Stopped mid-RSST-round and resumed: the same records as the run straight through
    # (which took the default; 2 batches given explicitly are the same).
    part = tiny_config(tmp_path / "part", bn_recalibrate=2, **kw)
    monkeypatch.setenv("RSST_JAX_STOP_AFTER", "4")  # round 1, epoch 1 done
    with pytest.raises(SystemExit):
        quiet_run(part)
    monkeypatch.delenv("RSST_JAX_STOP_AFTER")
    quiet_run(part.replace(resume=True))

    def strip(rows):
        return [{k: v for k, v in r.items() if "time" not in k} for r in rows]
    assert strip(json.loads((tmp_path / "part" / "summary.json").read_text())) == \
           strip(summary_on)
    assert strip(_rows(tmp_path / "part" / "log.jsonl")) == strip(log_on)


@pytest.mark.parametrize("n_train,batch_size,n,want", [
    (1257, 128, None, 1), (1257, 64, None, 2), (1257, 32, None, 4), (1257, 100, None, 2),
    (1257, 256, None, 1),
    (100, 32, None, 3),    # 3 whole batches are all an epoch has (steps_per_epoch)
    (20, 64, None, 1),     # one (repeating) batch is all there is
    (1257, 32, 0, 0), (1257, 32, 3, 3),  # given: as given (0: off)
])
def test_the_default_takes_the_fewest_batches_holding_128_images(n_train, batch_size, n,
                                                                  want):
    assert config_lib.BN_IMAGES == 128
    assert train_lib.bn_batch_count(n_train, batch_size, n, config_lib.BN_IMAGES) == want


def test_more_batches_than_an_epoch_has_is_bad_input(tmp_path, monkeypatch, capsys):
    from experiments import run as run_cli
    use_tiny_data(monkeypatch)
    code = run_cli.main(["--dataset", "digits", "--arch", "tiny_cnn", "--batch_size", "64",
                         "--bn_recalibrate", "6", "--save_dir", str(tmp_path / "r")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --bn_recalibrate 6: the training set has 5 batches of --batch_size; "
        "choose 1 to 5"]
    assert not (tmp_path / "r").exists()


from test_compact import ticket  # noqa: E402,F401  (a res20s ticket in the run layout)


def test_compact_re_estimates_the_statistics_it_keeps(ticket, tmp_path, capsys):  # noqa: F811 (the fixture)
    from experiments import compact as compact_cmd
    from rsst_jax import data as data_lib
    root, model, masked = ticket
    out = tmp_path / "out"
    assert compact_cmd.main([str(root), "--out", str(out), "--bn_recalibrate", "2",
                             "--batch_sizes", "1", "--runs", "1", "--eval_images", "2",
                             "--json"]) == 0
    capsys.readouterr()
    want = train_lib.recalibrated(model, masked, data_lib.load_dataset("digits"), 2, 128)
    _, cvars = compact_cmd.load(out)
    for layer in ("bn1", "layer3_2/bn2"):  # BatchNorms that keep every channel
        path = layer.split("/")
        got, expected, before = cvars["batch_stats"], want["batch_stats"], masked["batch_stats"]
        for key in path:
            got, expected, before = got[key], expected[key], before[key]
        np.testing.assert_allclose(got["mean"], expected["mean"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got["var"], expected["var"], rtol=1e-6, atol=1e-7)
        assert not np.allclose(got["mean"], before["mean"])
    assert compact_cmd.main([str(root), "--out", str(tmp_path / "o"), "--bn_recalibrate",
                             "100"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --bn_recalibrate 100: the training set has 9 batches of "
        "--batch_size; choose 1 to 9"]
