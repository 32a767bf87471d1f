"""Runs that survive SIGKILL, numerical trouble and a second run on the same directory.

The crash tests run real subprocesses of ``experiments.run`` on the tiny network (the
child script below registers it and swaps in tiny digits) and kill them with SIGKILL at
chosen moments: hooks in the child kill it from inside, so each kill lands exactly where
it is meant to (mid-epoch, inside an orbax write, between rounds, while deleting an old
checkpoint); one more kill comes from outside, when a checkpoint's temporary directory
appears.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsst_jax import checkpoint as ckpt
from rsst_jax import data as data_lib
from rsst_jax import runlock
from rsst_jax import train as train_lib
from experiments import run as run_cli

import tiny

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent
TESTS = pathlib.Path(__file__).resolve().parent

# The child: tiny net + tiny digits, then experiments.run.main(argv). RSST_TEST_KILL
# "kind:suffix:n" SIGKILLs the process at the n-th event of that kind whose path ends
# with suffix:
#   step     before the n-th optimizer step (no path); with fused chunks, before the chunk
#            that holds it
#   tmpdir   right after orbax created a temporary directory (step or item level)
#   commit   when orbax is about to commit a directory: an item (``<n>.orbax-checkpoint-
#            tmp/state``: data written, step still temporary) or a whole step (``<n>``:
#            complete, not yet renamed into place)
#   saved    right after rsst_jax.checkpoint.save returned (committed, old ones deleted)
#   discard  half-way through deleting an old checkpoint (renamed into .deleting/, half its
#            files gone)
#   summary  right after summary.json was written at the end of a round
# RSST_TEST_SLOW_COMMIT "suffix:seconds" holds the step-level commit of a checkpoint whose
# final path ends with suffix for that long (the step still temporary): a checkpoint in
# flight that a test can signal the process in.
CHILD = r"""
import os, signal, sys, time
import numpy as np
sys.path.insert(0, os.environ["RSST_TEST_DIR"])
import tiny  # registers tiny_cnn
from rsst_jax import data as data_lib
with np.load(os.environ["RSST_TEST_DATA"]) as f:  # tiny digits, saved by the test (no sklearn)
    _ds = data_lib.Dataset(name="tiny_digits", num_classes=10, flip=False,
                           mean=tuple(f["mean"]), std=tuple(f["std"]),
                           **{k: f[k] for k in f.files if k not in ("mean", "std")})
data_lib.load_dataset = lambda name, data_dir=None, seed=0: _ds

kind, pattern, count = (os.environ.get("RSST_TEST_KILL", "none::0").split(":") + [""])[:3]
count = int(count or 0)
seen = {"n": 0}

def hit(event, path=""):
    if event == kind and str(path).endswith(pattern):
        seen["n"] += 1
        if seen["n"] == count:
            sys.stdout.flush(); sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

from rsst_jax import callbacks, checkpoint as ckpt, engine
from orbax.checkpoint.path import atomicity

_create = atomicity._create_tmp_directory
async def _create_tmp_directory(fn, tmp_dir, **kw):
    out = await _create(fn, tmp_dir, **kw)
    hit("tmpdir", tmp_dir)
    return out
atomicity._create_tmp_directory = _create_tmp_directory

slow_suffix, _, slow_s = os.environ.get("RSST_TEST_SLOW_COMMIT", "").partition(":")
_finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self, *a, **kw):
    hit("commit", self.get_final())
    if slow_suffix and str(self.get_final()).endswith(slow_suffix):
        time.sleep(float(slow_s))
    return await _finalize(self, *a, **kw)
atomicity.AtomicRenameTemporaryPath.finalize = finalize

_save = ckpt.save
def save(directory, *a, **kw):
    _save(directory, *a, **kw)
    hit("saved", directory)
ckpt.save = save

import shutil
_rmtree = shutil.rmtree
def rmtree(path, *a, **kw):
    if os.path.basename(str(path)) == ".deleting" and os.path.isdir(path):
        files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
        for f in files[: len(files) // 2]:
            os.remove(f)
        hit("discard", os.path.dirname(str(path)))
    return _rmtree(path, *a, **kw)
shutil.rmtree = rmtree

_summary = callbacks.write_summary
def write_summary(paths, rows, *a, **kw):
    _summary(paths, rows, *a, **kw)
    hit("summary", paths.root)
callbacks.write_summary = write_summary

_init = engine.Engine.__init__
def init(self, *a, **kw):
    _init(self, *a, **kw)
    step, chunk = self.train_step, self.train_chunk
    def counted(*a, **kw):
        hit("step")
        return step(*a, **kw)
    def counted_chunk(state, data_x, data_y, perm, *a):
        for _ in range(perm.shape[1]):  # a fused chunk: dies before the chunk holding step n
            hit("step")
        return chunk(state, data_x, data_y, perm, *a)
    self.train_step, self.train_chunk = counted, counted_chunk
engine.Engine.__init__ = init

from experiments import run as cli
sys.exit(cli.main(sys.argv[1:]))
"""

TINY_FLAGS = ["--dataset", "digits", "--arch", "tiny_cnn", "--batch_size", "64", "--lr", "0.1",
              "--warmup", "0", "--decreasing_lr", "100", "--eval_batch_size", "100", "--seed", "0"]


def tiny_data_file() -> str:
    """tiny_digits as an .npz the children load without importing scikit-learn (~4 s)."""
    ds = tiny.tiny_digits(320)
    digest = hashlib.sha1(b"".join(np.ascontiguousarray(getattr(ds, k)).tobytes() for k in (
        "train_x", "train_y", "val_x", "val_y", "test_x", "test_y"))).hexdigest()[:12]
    path = ROOT / ".jax_cache" / f"tiny_digits_{digest}.npz"  # named by content: never stale
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.npz")
        np.savez(tmp, mean=np.asarray(ds.mean), std=np.asarray(ds.std),
                 **{k: getattr(ds, k) for k in ("train_x", "train_y", "val_x", "val_y",
                                                "test_x", "test_y")})
        os.replace(tmp, path)
    return str(path)


def child_env(**extra) -> dict:
    env = dict(os.environ, RSST_TEST_DIR=str(TESTS), RSST_TEST_DATA=tiny_data_file(),
               JAX_PLATFORMS="cpu", TQDM_DISABLE="1",
               JAX_COMPILATION_CACHE_DIR=str(ROOT / ".jax_cache"),
               # Cache even the small eager programs: a child compiles ~150 of them.
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RSST_JAX_STOP_AFTER", None)
    env.update(extra)
    return env


def start_child(args, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=ROOT, env=child_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_child(args, kill: str = "", timeout: float = 240) -> subprocess.CompletedProcess:
    env = {"RSST_TEST_KILL": kill} if kill else {}
    return subprocess.run([sys.executable, "-c", CHILD, *args], cwd=ROOT, env=child_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def strip_times(rows):
    return [{k: v for k, v in row.items() if "time" not in k} for row in rows]


def read_rows(path: pathlib.Path):
    if not path.exists():
        return []
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- crash safety

# (kill spec, newest committed resume checkpoint expected afterwards). With one epoch per
# round the resume checkpoints are numbered 2 * round + epochs done: 1 ends round 0's
# epoch, 2 opens round 1, ..., 6 ends the run. Each run resumes where the last one died.
KILL_CHAIN = [
    ("step::3", None),                                   # mid-epoch, before any checkpoint
    ("saved:best:1", None),                              # best/0 written, no checkpoint yet
    ("commit:checkpoints/1.orbax-checkpoint-tmp/state:1", None),  # first checkpoint mid-write
    ("commit:checkpoints/2.orbax-checkpoint-tmp/state:1", 1),  # between rounds, mid-write
    ("summary::1", 1),                                   # round 0 summarized, round 1 not begun
    ("commit:checkpoints/2:1", 1),                       # complete but not renamed into place
    ("discard:checkpoints:1", 3),                        # deleting 1 after 3 was committed
    ("step::3", 4),                                      # mid-epoch in round 2 (an RSST round)
    ("saved:checkpoints:1", 5),                          # just after checkpoint 5 committed
]


def test_sigkill_at_any_moment_resumes_to_the_uninterrupted_summary(tmp_path):
    flags = TINY_FLAGS + ["--struct", "rsst", "--criteria", "l1", "--pruning_times", "3",
                          "--epochs", "1", "--fused_steps", "2"]  # step::3 dies after a chunk
    ref_dir, dir_ = tmp_path / "reference", tmp_path / "killed"
    done = run_child(flags + ["--save_dir", str(ref_dir)])
    assert done.returncode == 0, done.stderr[-3000:]
    reference = strip_times(read_rows(ref_dir / "summary.json"))
    reference_log = strip_times(read_rows(ref_dir / "log.jsonl"))
    assert len(reference) == 3 and len(reference_log) == 3

    ckpts = dir_ / "checkpoints"
    newest = None
    for i, (kill, expected) in enumerate(KILL_CHAIN):
        args = flags + ["--save_dir", str(dir_)] + (["--resume"] if i else [])
        res = run_child(args, kill=kill)
        assert res.returncode == -signal.SIGKILL, (kill, res.returncode, res.stderr[-3000:])
        assert ckpt.latest_step(ckpts) == expected, (kill, os.listdir(ckpts))
        left = {p.name for p in ckpts.iterdir()} if ckpts.exists() else set()
        if kill.startswith("commit"):  # the kill really left a temporary dir behind
            assert any(n.endswith(".orbax-checkpoint-tmp") for n in left), (kill, left)
        if kill.startswith("discard"):  # and a half-deleted one
            assert ".deleting" in left and os.listdir(ckpts / ".deleting"), (kill, left)
        if expected is not None:
            # The newest committed checkpoint restores, and a kill never loses the one before.
            tree, meta = ckpt.restore_raw(ckpts)
            assert meta["round"] * 2 + meta["epoch"] == expected
            assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(tree["state"]))
            assert newest is None or expected >= newest
            newest = expected
        # Whatever was computed so far agrees with the uninterrupted run.
        log = strip_times(read_rows(dir_ / "log.jsonl"))
        assert log == reference_log[:len(log)], kill
        summary = strip_times(read_rows(dir_ / "summary.json"))
        assert summary == reference[:len(summary)], kill

    # One more kill from outside: SIGKILL as soon as a checkpoint's temporary directory shows.
    proc = start_child(flags + ["--save_dir", str(dir_), "--resume"])
    deadline, killed_mid_write = time.time() + 240, False
    while proc.poll() is None and time.time() < deadline:
        if glob.glob(str(ckpts / "*.orbax-checkpoint-tmp*")):
            proc.send_signal(signal.SIGKILL)
            killed_mid_write = True
            break
        time.sleep(0.001)
    proc.communicate(timeout=60)
    after = ckpt.latest_step(ckpts)
    assert after is not None and after >= newest
    ckpt.restore_raw(ckpts)

    final = run_child(flags + ["--save_dir", str(dir_), "--resume"])
    assert final.returncode == 0, final.stderr[-3000:]
    assert strip_times(read_rows(dir_ / "summary.json")) == reference
    assert strip_times(read_rows(dir_ / "log.jsonl")) == reference_log
    assert not (dir_ / runlock.LOCK_NAME).exists()
    assert not (ckpts / ".deleting").exists()
    print(f"{len(KILL_CHAIN) + killed_mid_write} kill points, all resumed to the reference")


# --------------------------------------------------------------------------- checkpoints

def _tree(value: float):
    return {"w": np.full((3,), value, np.float32)}


def test_steps_count_only_committed_checkpoints(tmp_path):
    d = tmp_path / "c"
    ckpt.save(d, 1, _tree(1.0), {"k": 1}, keep=2)
    ckpt.save(d, 2, _tree(2.0), {"k": 2}, keep=2)
    # What a kill leaves behind: an orbax temporary dir (even a complete one), a step
    # half-deleted in the trash; and a step set aside on resume.
    for src, name in ((d / "2", "3.orbax-checkpoint-tmp"), (d / "1", ".deleting/1"),
                      (d / "2", "4.bad")):
        (d / name).parent.mkdir(exist_ok=True)
        os.system(f"cp -r {src} {d / name}")
    assert ckpt.steps(d) == [1, 2] and ckpt.latest_step(d) == 2
    tree, meta = ckpt.restore(d, _tree(0.0))
    assert float(tree["w"][0]) == 2.0 and meta["k"] == 2
    # The next save (in a new process: a new manager, as after a kill) removes the stale
    # temporary dir, keeps the newest other step, finishes the interrupted deletion and
    # leaves the set-aside step alone.
    ckpt.close_managers()
    ckpt.save(d, 3, _tree(3.0), {"k": 3}, keep=2)
    assert ckpt.steps(d) == [2, 3]
    assert sorted(p.name for p in d.iterdir()) == ["2", "3", "4.bad"]
    assert float(ckpt.restore(d, _tree(0.0))[0]["w"][0]) == 3.0


def test_save_replaces_an_existing_step_and_keeps_the_new_one(tmp_path):
    d = tmp_path / "best"
    ckpt.save(d, 5, _tree(1.0), {"v": 1})
    ckpt.save(d, 5, _tree(2.0), {"v": 2})  # a resumed run recomputing the same epoch
    assert ckpt.steps(d) == [5] and ckpt.read_meta(d)["v"] == 2
    ckpt.save(d, 3, _tree(3.0), {"v": 3})  # keep=1 keeps the step just written
    assert ckpt.steps(d) == [3] and ckpt.read_meta(d)["v"] == 3


# --------------------------------------------------------------------------- numerical trouble

def _marked_digits():
    """Tiny digits whose training label 7 is shifted by 10 (out of range): the poisoned
    loss below is NaN for a batch holding it, so exactly one batch per epoch has a NaN
    loss. (Poisoning the loss, not the images: on XLA:CPU a NaN activation can vanish in
    a ReLU, leaving the loss finite and only the gradients NaN.)"""
    ds = tiny.tiny_digits(320)
    y = np.array(ds.train_y)
    y[7] += 10
    return data_lib.Dataset(name="marked", train_x=ds.train_x, train_y=y, val_x=ds.val_x,
                            val_y=ds.val_y, test_x=ds.test_x, test_y=ds.test_y, num_classes=10,
                            mean=ds.mean, std=ds.std, flip=False)


def _poison(monkeypatch, active: bool = True):
    """The training loss, NaN for a batch holding the marked label when ``active``."""
    cross_entropy = train_lib.cross_entropy

    def poisoned(logits, labels):
        bad = jnp.any(labels >= 10) & active
        return jnp.where(bad, jnp.nan, cross_entropy(logits, labels % 10))
    monkeypatch.setattr(train_lib, "cross_entropy", poisoned)


def _main(argv, capsys):
    code = run_cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


STEP_RE = re.compile(r"round (\d+), epoch (\d+), step (\d+)")


def test_nan_loss_stops_with_round_epoch_step_and_keeps_last_checkpoint(tmp_path, monkeypatch,
                                                                        capsys):
    ds = _marked_digits()
    monkeypatch.setattr(data_lib, "load_dataset", lambda name, data_dir=None, seed=0: ds)
    save = tmp_path / "nan"
    argv = TINY_FLAGS + ["--struct", "none", "--pruning_times", "2", "--epochs", "1",
                         "--save_dir", str(save)]
    monkeypatch.setenv("RSST_JAX_STOP_AFTER", "2")  # round 0 done, round 1 about to start
    _poison(monkeypatch, active=False)
    with pytest.raises(SystemExit):
        run_cli.main(argv)
    monkeypatch.delenv("RSST_JAX_STOP_AFTER")
    capsys.readouterr()
    before = ckpt.steps(save / "checkpoints")
    assert before[-1] == 2

    _poison(monkeypatch)
    code, _, err = _main(argv + ["--resume"], capsys)
    assert code == 3
    line = err.strip().splitlines()[-1]
    # rounds count from 0, epochs and steps from 1 (as everywhere)
    assert line.startswith("error: the loss became nan at round 1, epoch 1, step "), line
    assert "last good checkpoint is kept" in line
    stop_step = int(STEP_RE.search(line).group(3))
    assert 1 <= stop_step <= 5
    assert ckpt.steps(save / "checkpoints") == before  # nothing written after the NaN
    tree, meta = ckpt.restore_raw(save / "checkpoints")
    assert (meta["round"], meta["epoch"]) == (1, 0)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(tree["state"]))
    assert not (save / runlock.LOCK_NAME).exists()  # the lock went with the run

    # --nan_policy skip: the bad batch (the same step) is skipped and training goes on.
    skip = tmp_path / "skip"
    code, out, err = _main(TINY_FLAGS + ["--struct", "none", "--pruning_times", "2", "--epochs",
                                         "1", "--nan_policy", "skip", "--save_dir", str(skip)],
                           capsys)
    assert code == 0, err
    skipped = [n for n in out.splitlines() if n.startswith("skipped")]
    assert len(skipped) == 2  # one batch in each epoch
    assert all(n.startswith("skipped 1 batches with a non-finite loss") for n in skipped)
    where = [tuple(map(int, STEP_RE.search(n).groups())) for n in skipped]
    assert [w[:2] for w in where] == [(0, 1), (1, 1)]
    assert where[1][2] == stop_step
    rows = read_rows(skip / "summary.json")
    assert len(rows) == 2 and all(np.isfinite(r["final_test_acc"]) for r in rows)
    log = read_rows(skip / "log.jsonl")
    assert all(np.isfinite(r["train_loss"]) for r in log)
    tree, _ = ckpt.restore_raw(skip / "round_1" / "final")
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(tree["params"]))


def test_huge_learning_rate_diverges_with_exit_code_3(tmp_path, monkeypatch, capsys):
    tiny.use_tiny_data(monkeypatch)
    save = tmp_path / "lr"
    code, _, err = _main(TINY_FLAGS + ["--lr", "1e30", "--struct", "none", "--pruning_times",
                                       "2", "--epochs", "1", "--save_dir", str(save)], capsys)
    assert code == 3, err
    line = err.strip().splitlines()[-1]
    assert "round 0, epoch 1" in line and "Lower --lr" in line, line
    assert "Traceback" not in err
    assert ckpt.latest_step(save / "checkpoints") is None  # nothing good was ever reached


def test_exploding_rsst_lambda_is_caught(tmp_path, monkeypatch, capsys):
    tiny.use_tiny_data(monkeypatch)
    save = tmp_path / "lam"
    code, out, err = _main(TINY_FLAGS + ["--struct", "rsst", "--criteria", "magnitude",
                                         "--pruning_times", "2", "--epochs", "1",
                                         "--RST_schedule", "exp", "--reg_granularity_prune", "60",
                                         "--update_reg_interval", "1", "--save_dir", str(save)],
                           capsys)
    assert code == 3, err
    assert "warning: lr * lambda crosses" in out  # said before training
    line = err.strip().splitlines()[-1]
    assert re.search(r"round 1, epoch 1", line) and "--reg_upper_limit" in line, line
    # Round 0 (no penalty) finished and its checkpoints stay.
    assert ckpt.latest_step(save / "checkpoints") == 2
    assert len(read_rows(save / "summary.json")) == 1


# --------------------------------------------------------------------------- concurrency

def test_second_run_on_the_same_save_dir_refuses_and_a_dead_run_leaves_no_lock(tmp_path,
                                                                              monkeypatch,
                                                                              capsys):
    save = tmp_path / "shared"
    flags = TINY_FLAGS + ["--struct", "none", "--pruning_times", "1", "--epochs", "500",
                          "--save_dir", str(save)]
    first = start_child(flags)
    lock = save / runlock.LOCK_NAME
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None:
        info = runlock.RunLock(save).read()
        if info.get("pid") == first.pid:
            break
        time.sleep(0.05)
    try:
        assert first.poll() is None, first.communicate()[1][-3000:]
        info = json.loads(lock.read_text())
        assert info["pid"] == first.pid and info["hostname"] and info["started"]
        second = run_child(flags + ["--resume"])
        assert second.returncode == 2, second.stderr[-3000:]
        err = second.stderr.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert f"is in use by a run (pid {first.pid} on {info['hostname']}" in err
        assert "choose another --save_dir" in err
        # --dry_run says the same before anything else.
        tiny.use_tiny_data(monkeypatch)
        code, _, dry_err = _main(flags + ["--resume", "--dry_run"], capsys)
        assert code == 2 and f"pid {first.pid}" in dry_err
        assert first.poll() is None  # the refused runs did not disturb the first one
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    # SIGKILL: the file (with the dead pid) stays, the lock itself does not.
    assert json.loads(lock.read_text())["pid"] == first.pid
    notes = []
    with runlock.RunLock(save, log=notes.append) as held:
        assert held.read()["pid"] == os.getpid()
    assert len(notes) == 1 and "stale lock" in notes[0] and str(first.pid) in notes[0]
    assert "no longer running" in notes[0]
    assert not lock.exists()


def test_lock_is_exclusive_within_a_process_and_released(tmp_path):
    a = runlock.RunLock(tmp_path).acquire()
    with pytest.raises(runlock.RunLocked, match=f"pid {os.getpid()}"):
        runlock.RunLock(tmp_path).acquire()
    a.release()
    with runlock.RunLock(tmp_path) as b:
        assert b.held
    assert not (tmp_path / runlock.LOCK_NAME).exists()
