"""A preemption loses nothing: SIGTERM, SIGUSR2 or Ctrl-C while a checkpoint is being
written lets that checkpoint commit before the process ends (exit 130, the resume line),
so the resumed run starts after the epoch it had finished and ends with the summary of
an uninterrupted run. Also through SLURM (the local cluster of scripts/clusters.py): a
job preempted while its checkpoint is in flight is requeued and redoes no epoch."""
from __future__ import annotations

import glob
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from rsst_jax import checkpoint as ckpt
from rsst_jax import paths

from test_reliability import TINY_FLAGS, read_rows, run_child, start_child, strip_times

ROOT = pathlib.Path(__file__).resolve().parent.parent
FLAGS = TINY_FLAGS + ["--struct", "rsst", "--criteria", "l1", "--pruning_times", "2",
                      "--epochs", "2"]
HOLD_S = 3.0  # how long the test holds the first checkpoint's commit


# --------------------------------------------------------------------------- the hold itself

def _script(body: str, grace: float = 20.0) -> str:
    return textwrap.dedent(f"""
        import os, signal, sys, threading, time
        sys.path.insert(0, {str(ROOT)!r})
        from experiments import cli
        from rsst_jax import checkpoint as ckpt
        ckpt.WRITE_GRACE_S = {grace}
        def send(sig, after):
            threading.Timer(after, lambda: os.kill(os.getpid(), sig)).start()
    """) + textwrap.dedent(body)


def _run_script(body: str, grace: float = 20.0) -> tuple[subprocess.CompletedProcess, float]:
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", _script(body, grace)], capture_output=True,
                          text=True, timeout=120)
    return proc, time.time() - start


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR2", "SIGINT"])
def test_a_stop_signal_waits_for_the_write_in_flight(sig):
    """The signal comes 0.3 s into a group of writes that takes 1.5 s: the process ends
    (130, the resume line) only after the group, and starts no write after it."""
    proc, _ = _run_script(f"""
        with cli.ExitOnInterrupt("python -m x --resume"):
            send(signal.{sig}, 0.3)
            with ckpt.writing():
                time.sleep(1.5)
                print("committed", flush=True)
            with ckpt.writing():  # the next write never starts
                print("second write", flush=True)
            time.sleep(30)
    """)
    assert proc.returncode == 130, proc.stderr
    assert proc.stdout == "committed\n"
    assert proc.stderr == "interrupted; resume with: python -m x --resume\n"


def test_the_wait_is_bounded_and_a_signal_without_a_write_ends_at_once():
    """A write that outlasts WRITE_GRACE_S (here 0.5 s) does not keep the process: it
    ends 0.5 s after the signal; with no write in flight it ends at once."""
    proc, seconds = _run_script("""
        with cli.ExitOnInterrupt("python -m x --resume"):
            send(signal.SIGTERM, 0.2)
            with ckpt.writing():
                time.sleep(30)
                print("committed", flush=True)
    """, grace=0.5)
    assert proc.returncode == 130 and proc.stdout == "", proc
    assert seconds < 15, seconds  # the interpreter's start included
    proc, seconds = _run_script("""
        with cli.ExitOnInterrupt("python -m x --resume"):
            send(signal.SIGTERM, 0.2)
            time.sleep(30)
    """)
    assert proc.returncode == 130 and seconds < 15, (proc, seconds)


def test_an_ignored_sigusr2_stays_ignored():
    """A launcher that handles SIGUSR2 itself starts the command with it ignored
    (experiments.launchers): the command goes on; SIGTERM still stops it."""
    proc, _ = _run_script("""
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        with cli.ExitOnInterrupt("python -m x --resume"):
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.5)
            print("alive", flush=True)
            send(signal.SIGTERM, 0.1)
            time.sleep(30)
    """)
    assert proc.returncode == 130 and proc.stdout == "alive\n", proc


# --------------------------------------------------------------------------- a real run

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The summary and log of the uninterrupted run."""
    save = tmp_path_factory.mktemp("reference") / "run"
    done = run_child(FLAGS + ["--save_dir", str(save)])
    assert done.returncode == 0, done.stderr[-3000:]
    return strip_times(read_rows(save / "summary.json")), strip_times(read_rows(save / "log.jsonl"))


def _in_flight(save: pathlib.Path) -> bool:
    """The first epoch's line is in log.jsonl and checkpoint 1 is still temporary."""
    log = paths.RunPaths.of(save).log
    checkpoints = paths.RunPaths.of(save).checkpoints
    return (log.exists() and log.read_text().count("\n") >= 1
            and bool(glob.glob(str(checkpoints / "1.orbax-checkpoint-tmp*"))))


def _signal_in_flight(save: pathlib.Path, sig) -> tuple[subprocess.Popen, float, str]:
    """Start the run with checkpoint 1's commit held HOLD_S seconds, send ``sig`` right
    after the first epoch's line while the checkpoint is in flight; (process, seconds
    from the signal to the exit, stderr)."""
    proc = start_child(FLAGS + ["--save_dir", str(save)],
                       RSST_TEST_SLOW_COMMIT=f"checkpoints/1:{HOLD_S}")
    deadline = time.time() + 240
    while not _in_flight(save):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    sent = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc, time.time() - sent, err


@pytest.mark.slow
def test_sigterm_while_a_checkpoint_is_written_resumes_after_that_epoch(tmp_path, reference):
    """SIGTERM right after round 0's first epoch line, while checkpoint 1 is written: the
    checkpoint commits, the process exits 130 with the resume line, and the resumed run
    starts at round 0, epoch 1 (the epoch is not redone) and ends with the uninterrupted
    run's summary and log (all but times)."""
    want_summary, want_log = reference
    save = tmp_path / "run"
    proc, seconds, err = _signal_in_flight(save, signal.SIGTERM)
    print(f"\nSIGTERM to exit with checkpoint 1 in flight (commit held {HOLD_S} s): "
          f"{seconds:.2f} s")
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted; resume with: ")
    checkpoints = paths.RunPaths.of(save).checkpoints
    assert ckpt.steps(checkpoints) == [1]
    assert not glob.glob(str(checkpoints / "*.orbax-checkpoint-tmp*"))
    assert ckpt.read_meta(checkpoints)["epoch"] == 1
    assert seconds < ckpt.WRITE_GRACE_S
    assert [json.loads(x)["epoch"] for x in paths.RunPaths.of(save).log.read_text().splitlines()] \
        == [1]

    done = run_child(FLAGS + ["--save_dir", str(save), "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "at round 0, epoch 1" in done.stdout and "holds no checkpoint" not in done.stdout
    assert "round 0 epoch 1/" not in done.stdout  # not trained again
    assert "round 0 epoch 2/" in done.stdout
    assert strip_times(read_rows(save / "summary.json")) == want_summary
    assert strip_times(read_rows(save / "log.jsonl")) == want_log


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGUSR2", "SIGINT"])
def test_sigusr2_and_ctrl_c_also_let_the_checkpoint_commit(tmp_path, sig):
    save = tmp_path / "run"
    proc, seconds, err = _signal_in_flight(save, getattr(signal, sig))
    assert proc.returncode == 130, err[-3000:]
    checkpoints = paths.RunPaths.of(save).checkpoints
    assert ckpt.steps(checkpoints) == [1]
    assert not glob.glob(str(checkpoints / "*.orbax-checkpoint-tmp*"))
    assert seconds < ckpt.WRITE_GRACE_S


# --------------------------------------------------------------------------- SLURM

# The boot module of the sweep's programs: tiny network and data (test_commands.BOOT), and
# checkpoint 1's commit held RSST_TEST_SLOW_COMMIT ("suffix:seconds") like the child above.
SLOW_COMMIT_BOOT = r"""
import os, time
from orbax.checkpoint.path import atomicity
_suffix, _, _hold = os.environ.get("RSST_TEST_SLOW_COMMIT", "").partition(":")
_finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def _slow_finalize(self, *a, **kw):
    if _suffix and str(self.get_final()).endswith(_suffix):
        time.sleep(float(_hold))
    return await _finalize(self, *a, **kw)
atomicity.AtomicRenameTemporaryPath.finalize = _slow_finalize
"""


@pytest.fixture(scope="module")
def slurm_sweep(tmp_path_factory):
    """A one-node SLURM cluster (scripts/clusters.py), a folder with the boot module, and
    a function running experiments.sweep there with the cluster's SLURM_CONF."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import clusters
    from test_commands import BOOT
    from test_reliability import child_env
    missing = clusters.slurm_missing()
    if missing:
        pytest.skip(f"no SLURM cluster here: {missing}")
    pytest.importorskip("submitit", reason="pip install -e '.[cluster]'")
    root = tmp_path_factory.mktemp("preempt")
    (root / "slowboot.py").write_text(BOOT + SLOW_COMMIT_BOOT)
    environ = child_env(PYTHONPATH=os.pathsep.join([str(ROOT), str(root)]))
    try:
        environ.update(clusters.start_slurm(root / "cluster"))
    except clusters.ClusterError as e:
        clusters.stop(root / "cluster")
        pytest.fail(f"the SLURM cluster did not start: {e}")

    def sweep(out: str, *extra, **env) -> subprocess.CompletedProcess:
        from test_commands import TINY_BASE
        argv = ["--import", "slowboot", "--base",
                TINY_BASE + " --pruning_times 2 --epochs 2 --struct none", "--grid", "seed=0",
                "--no-group", "--no_compare", *extra]
        return subprocess.run([sys.executable, "-m", "experiments.sweep", "--out", out, *argv],
                              cwd=root, env=dict(environ, **env), capture_output=True, text=True,
                              timeout=300)
    yield root, environ, sweep
    clusters.stop(root / "cluster")


@pytest.mark.slow
def test_a_slurm_job_preempted_while_checkpointing_is_requeued_and_redoes_no_epoch(slurm_sweep):
    """The preemption signals (SIGTERM, then submitit's SIGUSR2) reach the job right after
    round 0's first epoch line, while checkpoint 1 is being written: the checkpoint
    commits, submitit requeues the job, and the requeued program resumes at round 0,
    epoch 1: round 0's first epoch is trained once, and the run ends with the summary of
    the same cell trained by the local launcher."""
    root, environ, sweep = slurm_sweep
    local = sweep("local")
    assert local.returncode == 0, local.stderr[-3000:]
    slurm = ["--launcher", "slurm", "--cpus", "1", "--time", "10"]
    submitted = sweep("slurm", *slurm, "--detach", RSST_TEST_SLOW_COMMIT=f"checkpoints/1:{HOLD_S}")
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job = json.loads((root / "slurm" / "sweep.json").read_text())["cells"][0]["job"]
    cell = root / "slurm" / "seed=0"
    deadline = time.time() + 240
    while not _in_flight(cell):
        assert time.time() < deadline, "checkpoint 1 in flight"
        time.sleep(0.01)
    sent = time.time()
    for sig in ("TERM", "USR2"):  # a preemption, as submitit's job._interrupt() sends it
        subprocess.run(["scancel", "--signal", sig, job], env=environ, check=True)
    output = paths.RunPaths.of(cell).output
    while "resuming" not in output.read_text():
        assert time.time() - sent < 180, output.read_text()[-3000:]
        time.sleep(0.1)
    print(f"\nrequeued and resumed {time.time() - sent:.1f} s after the preemption signal")

    collected = sweep("slurm", *slurm)  # waits for the job
    assert collected.returncode == 0, collected.stderr[-3000:]
    said = output.read_text()
    assert said.count("round 0 epoch 1/2:") == 1, said  # the epoch was not trained again
    assert said.count("round 0 epoch 2/2:") == 1, said
    resumed = [x for x in said.splitlines() if x.startswith("resuming")]
    assert len(resumed) == 1 and resumed[0].endswith("at round 0, epoch 1"), said
    assert said.count("holds no checkpoint yet") == 1  # the first attempt's start only
    assert "Restarts=1" in subprocess.run(["scontrol", "show", "job", job], env=environ,
                                          capture_output=True, text=True).stdout
    assert strip_times(read_rows(cell / "summary.json")) == \
        strip_times(read_rows(root / "local" / "seed=0" / "summary.json"))
    assert len(read_rows(cell / "summary.json")) == 2
