"""Watching runs: TensorBoard event files (written without TensorFlow, read back here)
and Weights & Biases in offline mode."""
import json
import shutil
import struct
import sys

import numpy as np
import pytest

from rsst_jax import checkpoint as ckpt
from rsst_jax import masks as masks_lib
from rsst_jax import tensorboard as tb
from rsst_jax import tickets
from tiny import quiet_run, tiny_config, use_tiny_data


def test_crc32c_and_the_record_framing_match_known_values():
    assert tb.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert tb.crc32c(b"") == 0
    assert tb.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720, B.4: 32 bytes of zeros
    data = b"abc"
    rec = tb.record(data)
    assert len(rec) == 8 + 4 + 3 + 4
    assert struct.unpack("<Q", rec[:8])[0] == 3 and rec[12:15] == data
    crc = tb.crc32c(data)
    assert struct.unpack("<I", rec[15:])[0] == ((((crc >> 15) | (crc << 17)) + 0xA282EAD8)
                                                & 0xFFFFFFFF)


def test_events_encode_and_decode_back(tmp_path):
    body = tb.encode_event(1234.5, 7, scalars={"a/b": 0.25, "c": -3.0})
    assert tb.decode_event(body) == (1234.5, 7, None, [("a/b", 0.25), ("c", -3.0)])
    head = tb.encode_event(1.0, 0, file_version=tb.FILE_VERSION)
    assert tb.decode_event(head) == (1.0, 0, b"brain.Event:2", [])
    w = tb.EventWriter(tmp_path, skip={("x", 1)})
    w.scalars(1, {"x": 1.0, "y": 2.0, "z": None})
    w.scalars(300, {"x": 0.1})
    assert tb.read_scalars(tmp_path) == []  # nothing on disk before the flush
    w.flush()
    assert w.path.name.startswith("events.out.tfevents.")
    got = [(s.step, s.tag, s.value) for s in tb.read_scalars(tmp_path)]
    assert got == [(1, "y", 2.0), (300, "x", np.float32(0.1))]
    with open(w.path, "ab") as f:  # a torn last record (the process ended mid-write)
        f.write(tb.record(b"x" * 40)[:20])
    assert len(tb.read_scalars(tmp_path)) == 2
    w.path.write_bytes(w.path.read_bytes()[:12] + b"\xff" + w.path.read_bytes()[13:])
    with pytest.raises(ValueError, match="bad data CRC"):
        tb.read_scalars(tmp_path)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_ticket_writes_its_events_and_they_match_the_log_after_a_resume(tmp_path,
                                                                             monkeypatch):
    """Two RSST tickets as one program, stopped after round 0 and resumed from one epoch
    earlier (its newest checkpoint lost): each ticket's events equal its log.jsonl and
    summary.json, every (tag, step) once, in two files."""
    use_tiny_data(monkeypatch)
    cfgs = [tiny_config(tmp_path / f"seed_{s}", seed=s, struct="rsst", criteria="l1",
                        pruning_times=2, epochs=2) for s in (0, 1)]
    monkeypatch.setenv("RSST_JAX_STOP_AFTER", "3")  # round 0's two epochs and its end
    with pytest.raises(SystemExit):
        quiet_run(cfgs)
    monkeypatch.delenv("RSST_JAX_STOP_AFTER")
    for c in cfgs:  # as if killed before the last checkpoint: resume redoes round 0's end
        newest = ckpt.latest_step(tmp_path / c.run.save_dir / "checkpoints")
        shutil.rmtree(tmp_path / c.run.save_dir / "checkpoints" / str(newest))
    quiet_run([c.replace(resume=True) for c in cfgs])
    seen_values = []
    for c in cfgs:
        root = tmp_path / c.run.save_dir
        assert len(tb.event_files(root)) == 2
        scalars = tb.read_scalars(root)
        pairs = [(s.tag, s.step) for s in scalars]
        assert len(pairs) == len(set(pairs))
        got = {(s.tag, s.step): s.value for s in scalars}
        want = {}
        for row in _rows(root / "log.jsonl"):
            step = row["round"] * 2 + row["epoch"]
            for key in ("train_loss", "train_acc", "val_acc", "test_acc", "lr"):
                want[f"epoch/{key}", step] = row[key]
            if row["round"] == 1:  # RSST's penalty runs in round 1
                want["epoch/reg_lambda", step] = row["reg_lambda"]
                want["epoch/target_norm_rel", step] = row["target_norm_rel"]
        summary = json.loads((root / "summary.json").read_text())
        assert [r["round"] for r in summary] == [0, 1]
        for row in summary:
            for key in ("remaining_weight_pct", "channel_sparsity_pct", "best_val_acc",
                        "final_test_acc"):
                want[f"round/{key}", row["round"]] = row[key]
            if row["round"] == 1:
                want["round/acc_before_s", 1] = row["acc_before_s"]
                want["round/acc_after_s", 1] = row["acc_after_s"]
            final = tickets.load(root, round_idx=row["round"])
            for layer in masks_lib.report(final.masks):
                want[f"density/{layer.path}", row["round"]] = layer.density
        assert {k: got[k] for k in want} == {k: np.float32(v) for k, v in want.items()}
        assert len(_rows(root / "log.jsonl")) == 4 and ("epoch/val_loss", 4) in got
        assert got["density/conv2/kernel", 1] < 1.0
        seen_values.append(got)
    assert seen_values[0] != seen_values[1]  # two tickets, two different records


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
