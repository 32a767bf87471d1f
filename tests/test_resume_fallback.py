"""--resume past a damaged newest checkpoint (issue 16): the damaged one is set aside
(renamed, nothing deleted) with one line, the run resumes from the one before and ends
with the uninterrupted run's summary; when none is usable: exit 2, one line, no traceback."""
from __future__ import annotations

import pathlib
import shutil

import numpy as np
import pytest

from rsst_jax import checkpoint as ckpt

from test_reliability import TINY_FLAGS, read_rows, run_child, start_child, strip_times

pytestmark = pytest.mark.slow

FLAGS = TINY_FLAGS + ["--struct", "rsst", "--criteria", "magnitude", "--pruning_times", "2",
                      "--epochs", "2"]


def _data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in (step_dir / "state").rglob("*") if p.is_file()
                  and p.parent.name == "d")


def truncate(step_dir):
    for f in _data_files(step_dir)[:1]:
        f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 2)])


def random_bytes(step_dir):
    rng = np.random.default_rng(0)
    for f in _data_files(step_dir):
        f.write_bytes(rng.integers(0, 256, f.stat().st_size, dtype=np.uint8).tobytes())


def no_metadata(step_dir):
    (step_dir / "meta" / "metadata").unlink()


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """An uninterrupted run's summary, and a run stopped after its 4th checkpoint
    (checkpoints 3 and 4 kept: epoch 1 of round 1 done, then epoch 2)."""
    root = tmp_path_factory.mktemp("fallback")
    full = run_child(FLAGS + ["--save_dir", str(root / "full")])
    assert full.returncode == 0, full.stderr[-3000:]
    part = root / "part"
    child = start_child(FLAGS + ["--save_dir", str(part)], RSST_JAX_STOP_AFTER="4")
    _, err = child.communicate(timeout=240)
    assert child.returncode == 75, err[-3000:]
    assert ckpt.steps(part / "checkpoints") == [3, 4]
    return read_rows(root / "full" / "summary.json"), part


@pytest.mark.parametrize("damage", [truncate, random_bytes, no_metadata])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(interrupted, tmp_path, damage):
    want, part = interrupted
    save = tmp_path / "run"
    shutil.copytree(part, save)
    damage(save / "checkpoints" / "4")
    res = run_child(FLAGS + ["--save_dir", str(save), "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stdout.splitlines() if "is unusable" in ln]
    assert len(lines) == 1 and f"{save / 'checkpoints' / '4'}" in lines[0], res.stdout[-2000:]
    assert "set aside as" in lines[0] and "trying the previous one" in lines[0]
    assert (save / "checkpoints" / "4.bad").is_dir()  # set aside, not deleted
    assert "resuming" in res.stdout and "at round 1, epoch 0" in res.stdout  # checkpoint 3
    assert strip_times(read_rows(save / "summary.json")) == strip_times(want)


def test_resume_with_no_usable_checkpoint_exits_2_with_one_line(interrupted, tmp_path):
    _, part = interrupted
    save = tmp_path / "run"
    shutil.copytree(part, save)
    for step in (3, 4):
        random_bytes(save / "checkpoints" / str(step))
    res = run_child(FLAGS + ["--save_dir", str(save), "--resume"])
    assert res.returncode == 2, res.stderr[-3000:]
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no usable checkpoint in "), err
    assert "tried 4 (" in err[0] and "; 3 (" in err[0] and "--resume" in err[0]
    assert "Traceback" not in res.stderr and "Event loop is closed" not in res.stderr
    assert sorted(p.name for p in (save / "checkpoints").iterdir()) == ["3.bad", "4.bad"]
