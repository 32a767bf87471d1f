"""Sweeps through launchers, against real clusters started on this machine
(scripts/clusters.py): a SLURM cluster from Debian's packages (munged, slurmctld, slurmd)
and a Ray head with one worker node. Each ends with exactly the summaries of the local
launcher: with --detach, --status and a collecting rerun; after a SLURM job is preempted
and requeued mid-round; after the Ray worker node dies mid-program. Where the packages
are missing the cluster tests are skipped with the reason (.ci/run installs them).

Also here: a sweep ended by SIGTERM records each cell's real outcome, and the launcher
flags' bad input (exit 2, one line).
"""
from __future__ import annotations

import json
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

from experiments import sweep
from rsst_jax import checkpoint as ckpt
from rsst_jax import paths, runlock

import tiny  # noqa: F401  registers tiny_cnn for the in-process bad-input checks
from test_commands import BOOT, TINY_BASE, one_error_line, outcome
from test_reliability import child_env, read_rows, strip_times

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import clusters  # noqa: E402

# One worker runs every test here, one after another: one cluster of each kind at a time
# (pyproject's addopts has --dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("clusters")]

# RSST_TEST_SLOW_SAVE=S: every checkpoint save sleeps S seconds afterwards, so that a
# test can act between two checkpoints of the same round (the numbers do not change).
SLOW_BOOT = BOOT + r"""
from rsst_jax import checkpoint as _ckpt
import time as _time
_save = _ckpt.save
def _slow_save(*a, **kw):
    _save(*a, **kw)
    _time.sleep(float(os.environ.get("RSST_TEST_SLOW_SAVE", "0")))
_ckpt.save = _slow_save
"""
ARGV = ["--import", "tinyboot", "--base", TINY_BASE + " --pruning_times 2 --epochs 2 --struct none",
        "--grid", "seed=0,1", "--no-group", "--no_compare"]
CELLS = ("seed=0", "seed=1")


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    """A folder with the tiny boot module, and the environment sweeps run with there."""
    root = tmp_path_factory.mktemp("clusters")
    (root / "tinyboot.py").write_text(SLOW_BOOT)
    return root, child_env(PYTHONPATH=os.pathsep.join([str(ROOT), str(root)]))


def start_sweep(work, out: str, *extra, **env) -> subprocess.Popen:
    root, environ = work
    return subprocess.Popen([sys.executable, "-m", "experiments.sweep", "--out", out, *ARGV, *extra],
                            cwd=root, env=dict(environ, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_sweep(work, out: str, *extra, timeout: float = 240, **env) -> tuple[int, str, str]:
    proc = start_sweep(work, out, *extra, **env)
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


def summaries(root: pathlib.Path) -> dict:
    return {c: strip_times(read_rows(paths.RunPaths.of(root / c).summary_json)) for c in CELLS}


@pytest.fixture(scope="session")
def reference(work):
    """The summaries of the two cells trained by the local launcher."""
    code, out, err = run_sweep(work, "local")
    assert code == 0, err[-3000:]
    rows = summaries(work[0] / "local")
    assert all(len(r) == 2 for r in rows.values()), rows
    return rows


def has_checkpoint(cell: pathlib.Path) -> bool:
    return ckpt.latest_step(paths.RunPaths.of(cell).checkpoints) is not None


def wait_for(what: str, ready, timeout: float = 120, proc=None, every: float = 0.02) -> float:
    start = time.time()
    while not ready():
        assert time.time() - start < timeout, what
        assert proc is None or proc.poll() is None, (what, proc.communicate())
        time.sleep(every)
    return time.time() - start


# --------------------------------------------------------------------------- SLURM


@pytest.fixture(scope="session")
def slurm(work):
    """A one-node SLURM cluster; SLURM_CONF points the sweeps' sbatch at it."""
    missing = clusters.slurm_missing()
    if missing:
        pytest.skip(f"no SLURM cluster here: {missing}")
    try:
        import submitit  # noqa: F401
    except ImportError:
        pytest.skip("no SLURM launcher here: submitit is not installed; pip install -e '.[cluster]'")
    root = work[0] / "slurm"
    start = time.time()
    try:
        env = clusters.start_slurm(root)
    except clusters.ClusterError as e:
        clusters.stop(root)
        pytest.fail(f"the SLURM cluster did not start: {e}")
    print(f"\nSLURM cluster up in {time.time() - start:.1f} s")
    yield env
    clusters.stop(root)


def squeue_state(job: str, env: dict) -> str:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%T"], env=env,
                         capture_output=True, text=True)
    return out.stdout.strip()


def test_slurm_detached_sweep_is_collected_with_the_local_summaries(work, slurm, reference):
    """--detach submits one job per program and returns; --status names each cell's job;
    the same command again collects the jobs (submitting nothing) and the summaries are
    the local launcher's; once more, it has nothing to do."""
    argv = ["--launcher", "slurm", "--cpus", "1", "--time", "10"]
    code, out, err = run_sweep(work, "slurm_two", *argv, "--detach", **slurm)
    assert code == 0, err
    record = json.loads((work[0] / "slurm_two" / sweep.RECORD).read_text())
    jobs = [c["job"] for c in record["cells"]]
    assert record["launcher"] == "slurm" and all(jobs) and len(set(jobs)) == 2, record
    for cell, job in zip(CELLS, jobs):
        assert f"submitted {cell} as slurm job {job}" in out, out
    status = subprocess.run([sys.executable, "-m", "experiments.sweep", "--status", "slurm_two"],
                            cwd=work[0], env=dict(work[1], **slurm), capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    for cell, job in zip(CELLS, jobs):
        line = next(x for x in status.stdout.splitlines() if x.strip().startswith(cell))
        assert f"(job {job})" in line and ("queued" in line or "running" in line), status.stdout

    code, out, err = run_sweep(work, "slurm_two", *argv, **slurm)
    assert code == 0, err[-3000:]
    assert "submitted" not in out and out.count("collecting it") == 2, out
    assert summaries(work[0] / "slurm_two") == reference
    record = json.loads((work[0] / "slurm_two" / sweep.RECORD).read_text())
    assert [(c["status"], c["job"]) for c in record["cells"]] == [("finished", j) for j in jobs]
    code, out, err = run_sweep(work, "slurm_two", *argv, **slurm)
    assert code == 0 and "submitted" not in out and "2 of 2 cells finished" in out, out


def test_slurm_job_preempted_mid_round_is_requeued_and_ends_as_uninterrupted(work, slurm, reference):
    """The preemption signals (SIGTERM, then submitit's SIGUSR2) after the first
    checkpoint of round 0: submitit requeues the job with the same id, its program
    resumes at round 0, epoch 1, and the summaries are the local launcher's."""
    import submitit
    argv = ["--launcher", "slurm", "--time", "10"]
    code, out, err = run_sweep(work, "slurm_preempt", *argv, "--detach", **slurm,
                               RSST_TEST_SLOW_SAVE="1.0")
    assert code == 0, err
    cell = work[0] / "slurm_preempt" / "seed=0"
    job = json.loads((work[0] / "slurm_preempt" / sweep.RECORD).read_text())["cells"][0]["job"]
    wait_for("the first checkpoint", lambda: has_checkpoint(cell))
    assert ckpt.latest_step(paths.RunPaths.of(cell).checkpoints) == 1  # round 0, epoch 1
    os.environ["SLURM_CONF"] = slurm["SLURM_CONF"]  # for submitit's scancel
    try:
        submitit.SlurmJob(work[0] / "slurm_preempt" / sweep.JOBS / job, job)._interrupt()
    finally:
        os.environ.pop("SLURM_CONF")
    sent = time.time()
    wait_for("the requeued job running again",
             lambda: "resuming" in paths.RunPaths.of(cell).output.read_text(), timeout=120)
    print(f"\nrequeued and resumed {time.time() - sent:.1f} s after the preemption signal")

    code, out, err = run_sweep(work, "slurm_preempt", *argv, **slurm)
    assert code == 0, err[-3000:]
    assert "submitted" not in out, out
    log = paths.RunPaths.of(cell).output.read_text()
    assert f"resuming {cell.relative_to(work[0])} at round 0, epoch 1" in log, log
    assert "Restarts=1" in subprocess.run(["scontrol", "show", "job", job], env=dict(os.environ, **slurm),
                                          capture_output=True, text=True).stdout
    assert summaries(work[0] / "slurm_preempt") == reference


# --------------------------------------------------------------------------- Ray


@pytest.fixture(scope="session")
def ray_cluster(work):
    """A Ray head and one worker node, one CPU each: each of two programs lands on its
    own node."""
    missing = clusters.ray_missing()
    if missing:
        pytest.skip(f"no Ray cluster here: {missing}")
    root = work[0] / "ray"
    start = time.time()
    try:
        cluster = clusters.start_ray(root, env=work[1])
    except clusters.ClusterError as e:
        clusters.stop(root)
        pytest.fail(f"the Ray cluster did not start: {e}")
    print(f"\nRay head and worker up in {time.time() - start:.1f} s")
    yield dict(cluster, root=root)
    clusters.stop(root)


def _program_on(root: pathlib.Path, node: str) -> str:
    """The cell whose program runs on ``node`` ('' while none does)."""
    for pid in clusters.marked_pids(f"{root.resolve()}/{node}"):
        try:
            cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode() for a in cmd]
        if any("_program_entry" in a for a in args) and "--save_dir" in args:
            return pathlib.Path(args[args.index("--save_dir") + 1]).name
    return ""


def test_ray_task_of_a_lost_worker_node_reruns_on_the_head(work, ray_cluster, reference):
    """Two programs, one per node; the worker node is killed (its raylet and Ray's other
    processes there, SIGKILL) after the first checkpoint of its program: the task runs
    again on the head, resumes, and the summaries are the local launcher's."""
    proc = start_sweep(work, "ray", "--launcher", "ray", "--ray_address", ray_cluster["address"],
                       RSST_TEST_SLOW_SAVE="1.0")
    found = []
    wait_for("a program on the worker node",
             lambda: found.append(_program_on(ray_cluster["root"], "worker")) or found[-1], proc=proc,
             every=0.2)
    cell = work[0] / "ray" / found[-1]
    wait_for("its first checkpoint", lambda: has_checkpoint(cell), proc=proc)
    killed = clusters.kill_ray_node(ray_cluster["root"], "worker")
    assert killed
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    log = paths.RunPaths.of(cell).output.read_text()
    assert f"resuming {cell.relative_to(work[0])} at round 0, epoch" in log, log
    assert summaries(work[0] / "ray") == reference


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_ends_a_sweep_with_each_cells_real_outcome_recorded(work):
    """SIGTERM after the first cell finished and the second checkpointed: exit 130 with
    the resume line, and sweep.json says finished and partial (not new and new)."""
    proc = start_sweep(work, "sigterm", RSST_TEST_SLOW_SAVE="0.5")
    second = work[0] / "sigterm" / "seed=1"
    wait_for("the second cell's first checkpoint", lambda: has_checkpoint(second), proc=proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted; resume with: python -m experiments.sweep")
    record = json.loads((work[0] / "sigterm" / sweep.RECORD).read_text())
    assert [(c["name"], c["status"]) for c in record["cells"]] == [
        ("seed=0", "finished"), ("seed=1", "partial")]
    with runlock.RunLock(second):  # its program is gone too
        pass


# --------------------------------------------------------------------------- bad input


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("extra, says", [
    (["--gpus", "1"], "--gpus is for --launcher slurm or ray"),
    (["--detach"], "--detach is for --launcher slurm"),
    (["--launcher", "ray", "--partition", "gpu", "--ray_address", "127.0.0.1:1"],
     "--partition is for --launcher slurm"),
    (["--launcher", "slurm", "--ray_address", "127.0.0.1:1"], "--ray_address is for --launcher ray"),
    (["--launcher", "slurm", "--parallel", "2"], "--parallel is for --launcher local"),
    (["--launcher", "ray"], "--launcher ray needs --ray_address HOST:PORT"),
    (["--launcher", "ray", "--ray_address", "headnode"], "--ray_address wants HOST:PORT"),
    (["--launcher", "slurm", "--sbatch", "account=abc"], "--sbatch wants sbatch options as --name=value"),
])
def test_launcher_flags_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, says):
    pytest.importorskip("submitit") if "slurm" in extra else None
    pytest.importorskip("ray") if "127.0.0.1:1" in extra or "headnode" in extra else None
    code, err = outcome(sweep.main, ["--out", str(tmp_path / "s"), *ARGV[2:], *extra], capsys)
    assert code == 2 and says in one_error_line(err), err


def test_a_ray_address_that_does_not_answer_is_bad_input(tmp_path, capsys, monkeypatch):
    pytest.importorskip("ray")
    from experiments import launchers
    monkeypatch.setattr(launchers, "RAY_ANSWER_S", 1.0)  # 30 s in use
    address = f"127.0.0.1:{_closed_port()}"
    start = time.time()
    code, err = outcome(sweep.main, ["--out", str(tmp_path / "s"), *ARGV[2:], "--launcher", "ray",
                                     "--ray_address", address], capsys)
    assert code == 2 and f"--ray_address {address}: nothing answered within 1 s" in \
        one_error_line(err), err
    assert time.time() - start < 10


def test_slurm_without_sbatch_is_bad_input(tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, srun or squeue there
    code, err = outcome(sweep.main, ["--out", str(tmp_path / "s"), *ARGV[2:], "--launcher", "slurm"],
                        capsys)
    assert code == 2 and "--launcher slurm: sbatch not found" in one_error_line(err), err


def test_a_missing_launcher_package_is_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # what an environment without it sees
    code, err = outcome(sweep.main, ["--out", str(tmp_path / "s"), *ARGV[2:], "--launcher", "slurm"],
                        capsys)
    assert code == 2 and "--launcher slurm needs submitit: pip install" in one_error_line(err), err
