"""Watching runs: TensorBoard event files (written by tensorboardX, read back with
TensorBoard's own EventAccumulator) and Weights & Biases in offline mode."""
import json
import shutil
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from rsst_jax import checkpoint as ckpt
from rsst_jax import masks as masks_lib
from rsst_jax import monitoring
from rsst_jax import tickets
from tiny import quiet_run, tiny_config, use_tiny_data


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def tensorboard_scalars(logdir) -> dict:
    """{(tag, step): [values]} as TensorBoard shows the run in ``logdir`` (purges done),
    read by both of its readers (the scalars' EventAccumulator, and the one behind
    ``tensorboard --load_fast=false``; the default data server gives the same, see
    README), which must agree."""
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            out.setdefault((tag, event.step), []).append(event.value)
    plugin = plugin_event_accumulator.EventAccumulator(str(logdir),
                                                       size_guidance={"tensors": 0})
    plugin.Reload()
    other = {}
    for tag in plugin.Tags()["tensors"]:
        for event in plugin.Tensors(tag):
            other.setdefault((tag, event.step), []).append(
                float(tensor_util.make_ndarray(event.tensor_proto)))
    assert other == out
    return out


def expected_scalars(root, epochs: int) -> dict:
    """{(tag, step): value} of every number of log.jsonl and summary.json, and each
    round's layer densities, on the run's step axis (epochs trained so far)."""
    want = {}
    for row in _rows(root / "log.jsonl"):
        for key, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                want[f"epoch/{key}", row["round"] * epochs + row["epoch"]] = v
    for row in json.loads((root / "summary.json").read_text()):
        step = (row["round"] + 1) * epochs
        for key, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                want[f"round/{key}", step] = v
        for layer in masks_lib.report(tickets.load(root, round_idx=row["round"]).masks):
            want[f"density/{layer.path}", step] = layer.density
    return want


def assert_described(root, tags) -> None:
    """Each tag's description, as TensorBoard shows it under the chart's information
    icon, is the label declared for its key (the core's or RSST's), the densities' one
    for every layer, and nothing for the row's indices, which nobody declares."""
    plugin = plugin_event_accumulator.EventAccumulator(str(root))
    plugin.Reload()
    shown = {tag: plugin.SummaryMetadata(tag).summary_description for tag in tags}
    assert shown["epoch/val_acc"] == "validation accuracy (%) (per epoch)"
    assert shown["epoch/reg_lambda"] == "lambda (penalty coefficient) (per epoch)"
    assert shown["round/final_test_acc"] == "final test accuracy (%) (per round)"
    assert shown["density/conv2/kernel"] == monitoring.DENSITY_LABEL
    assert {tag for tag, text in shown.items() if not text} == {
        "epoch/round", "epoch/epoch", "round/round"}


def _drop_newest_checkpoint(root):
    newest = ckpt.latest_step(root / "checkpoints")
    shutil.rmtree(root / "checkpoints" / str(newest))


def test_tensorboard_holds_every_number_of_the_log_and_summary_once_after_resumes(
        tmp_path, monkeypatch):
    """Two RSST tickets as one program, stopped twice, each time as if killed before its
    newest checkpoint: first after round 0's end (the resume redoes the round's end, and
    its last epoch's scalars are written again from the checkpoint), then after round
    1's first epoch (the resume redoes that epoch). TensorBoard's reader finds every
    number of each ticket's log.jsonl and summary.json exactly once, at its step, and
    nothing else; three event files, the later two starting with a purge step."""
    use_tiny_data(monkeypatch)
    epochs = 2
    cfgs = [tiny_config(tmp_path / f"seed_{s}", seed=s, struct="rsst", criteria="l1",
                        pruning_times=2, epochs=epochs) for s in (0, 1)]
    monkeypatch.setenv("RSST_JAX_STOP_AFTER", "3")  # round 0's two epochs and its end
    with pytest.raises(SystemExit):
        quiet_run(cfgs)
    for c in cfgs:
        _drop_newest_checkpoint(tmp_path / c.run.save_dir)  # newest: round 0, epoch 2
    monkeypatch.setenv("RSST_JAX_STOP_AFTER", "2")  # round 0's end again, round 1 epoch 1
    with pytest.raises(SystemExit):
        quiet_run([c.replace(resume=True) for c in cfgs])
    monkeypatch.delenv("RSST_JAX_STOP_AFTER")
    for c in cfgs:
        _drop_newest_checkpoint(tmp_path / c.run.save_dir)  # newest: round 1, epoch 0
    quiet_run([c.replace(resume=True) for c in cfgs])

    seen = []
    for c in cfgs:
        root = tmp_path / c.run.save_dir
        assert len(monitoring.event_files(root)) == 3
        got = tensorboard_scalars(root)
        want = expected_scalars(root, epochs)
        assert sorted(got) == sorted(want)  # every number, no other (tag, step)
        assert {k: v for k, v in got.items() if len(v) != 1} == {}  # each once
        assert {k: v[0] for k, v in got.items()} == {k: np.float32(v) for k, v in want.items()}
        # The method's own columns are there without being named anywhere: RSST's
        # penalty in round 1, its accuracy before and after S.
        assert {("epoch/reg_scale", 3), ("epoch/target_count", 4), ("epoch/reg_lambda", 4),
                ("round/round_time_s", 2), ("density/conv2/kernel", 4)} <= set(got)
        assert any(t.startswith("round/") and "before" in t for t, _ in got)
        assert got["density/conv2/kernel", 4][0] < 1.0
        assert len(_rows(root / "log.jsonl")) == 4
        assert_described(root, {tag for tag, _ in got})
        seen.append(got)
    assert seen[0] != seen[1]  # two tickets, two different records


def test_the_monitors_take_every_event_of_the_driver():
    from rsst_jax.callbacks import Callback
    events = {n for n in dir(Callback) if not n.startswith("_") and callable(getattr(Callback, n))}
    for cls in (monitoring.TensorBoard, monitoring.Wandb):
        assert events <= {n for n in dir(cls) if callable(getattr(cls, n))}, cls
        assert cls.every_process is False


def test_a_resume_purges_from_its_first_step(tmp_path):
    """``first_step``: the epoch after the checkpoint's; the round's own step when every
    epoch of the round is done but not its end (its last epoch is written again)."""
    from rsst_jax.driver import Progress
    assert monitoring.first_step(Progress(round=0, epoch=0), 3) == 1
    assert monitoring.first_step(Progress(round=1, epoch=2), 3) == 6
    assert monitoring.first_step(Progress(round=1, epoch=3), 3) == 6 == \
        monitoring.round_step(1, 3) == monitoring.epoch_step(1, 3, 3)
    assert monitoring.row_numbers({"a": 1, "b": 2.5, "c": True, "d": "x", "e": None,
                                   "f": np.float32(0.5), "g": np.bool_(False), "h": [1]}) == \
        {"a": 1, "b": 2.5, "f": np.float32(0.5)}


def test_wandb_flag_without_wandb_installed_is_bad_input(tmp_path, monkeypatch, capsys):
    from experiments import run as run_cli
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    code = run_cli.main(["--dataset", "digits", "--wandb", "proj", "--save_dir",
                         str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ['error: --wandb proj needs the wandb package: '
                                 'pip install -e ".[wandb]"']
    assert not (tmp_path / "r").exists()


def test_wandb_is_not_a_semantic_setting():
    from rsst_jax import config as config_lib
    cfg = config_lib.Config()
    assert config_lib.semantic_diffs(cfg.to_dict(), cfg.replace(wandb="p").to_dict()) == ""


def test_wandb_offline_logs_the_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed "
                                                "(pip install -e \".[wandb]\")")
    use_tiny_data(monkeypatch)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(tmp_path / "sweep" / "cell", struct="none", pruning_times=1, epochs=2,
                      wandb="me/proj")
    rows, _ = quiet_run(cfg)
    root = tmp_path / "sweep" / "cell"
    run_id = (root / "wandb" / "run_id").read_text().strip()
    runs = sorted((root / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1
    record = (runs[0] / f"run-{run_id}.wandb").read_bytes()  # protobuf strings stay readable
    for text in ("proj", "sweep", "cell"):
        assert text.encode() in record, text
    log = _rows(root / "log.jsonl")
    # (each value is stored twice: as the step's partial history and as its history)
    assert set(_wandb_values(record, "epoch/val_acc")) == {row["val_acc"] for row in log}
    assert set(_wandb_values(record, "epoch/train_loss")) == {row["train_loss"] for row in log}
    assert set(_wandb_values(record, "round/final_test_acc")) == {rows[0]["final_test_acc"]}


def _wandb_values(record: bytes, key: str) -> list:
    """The values logged under ``key`` in a .wandb file: each HistoryItem holds the key
    (field 2) followed by its value as JSON (field 16, tag bytes 0x82 0x01)."""
    out, start, tag = [], 0, bytes([2 << 3 | 2, len(key)]) + key.encode() + b"\x82\x01"
    while (i := record.find(tag, start)) >= 0:
        n = record[i + len(tag)]
        out.append(json.loads(record[i + len(tag) + 1:i + len(tag) + 1 + n]))
        start = i + 1
    return out
