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

import fcntl
import importlib.util
import json
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from experiments import sweep
from rsst_jax import checkpoint as ckpt
from rsst_jax import paths, runlock

import tiny  # noqa: F401  registers tiny_cnn for the in-process bad-input checks
from test_commands import BOOT, TINY_BASE, one_error_line, outcome
from test_multihost import _CHILD, FLAGS, _env, _numbers, _one
from test_reliability import child_env, read_rows, strip_times

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import clusters  # noqa: E402

pytestmark = pytest.mark.slow

# RSST_TEST_SLOW_SAVE=S: a program sleeps S seconds after its first checkpoint, so that a
# test can act between the first two checkpoints of round 0 (the numbers do not change).
SLOW_BOOT = BOOT + r"""
from rsst_jax import checkpoint as _ckpt
import time as _time
_save, _saved = _ckpt.save, []
def _slow_save(directory, *a, **kw):
    _save(directory, *a, **kw)
    if not _saved and str(directory).endswith("checkpoints"):  # not init/ nor best/
        _saved.append(1)
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
def reference(work, tmp_path_factory, worker_id):
    """The summaries of the two cells trained by the local launcher: trained once per
    test session, by the first pytest-xdist worker that needs them."""
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if worker_id != "master" else shared  # the workers' common folder
    with open(shared / "cluster_reference.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = shared / "cluster_reference.json"
        if not done.exists():
            root, environ = work
            code, out, err = run_sweep((shared, environ), str(shared / "cluster_reference"),
                                       "--parallel", "2")
            assert code == 0, err[-3000:]
            rows = summaries(shared / "cluster_reference")
            assert all(len(r) == 2 for r in rows.values()), rows
            done.write_text(json.dumps(rows))
    return json.loads(done.read_text())


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
    root = work[0] / "slurm_cluster"
    start = time.time()
    try:
        env = clusters.start_slurm(root)
    except clusters.ClusterError as e:
        clusters.stop(root)
        pytest.fail(f"the SLURM cluster did not start: {e}")
    print(f"\nSLURM cluster up in {time.time() - start:.1f} s")
    yield env
    clusters.stop(root)


def resume_point(log: str) -> str:
    """"round R, epoch E" of the last epoch line printed before the run's first
    interruption in ``log`` (a run.log), or "round R+1, epoch 0" where round R's end was
    printed too: where a resume must start so that no epoch is redone."""
    before = log.split("\ninterrupted", 1)[0]
    epochs = re.findall(r"^round (\d+) epoch (\d+)/", before, re.MULTILINE)
    assert epochs, log
    r, e = map(int, epochs[-1])
    if re.search(rf"^round {r}: ", before, re.MULTILINE):
        return f"round {r + 1}, epoch 0"
    return f"round {r}, epoch {e}"


def squeue_state(job: str, env: dict) -> str:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%T"], env=env,
                         capture_output=True, text=True)
    return out.stdout.strip()


def test_slurm_detached_sweep_with_a_preempted_job_ends_with_the_local_summaries(
        work, slurm, reference):
    """--detach submits one job per program and returns; --status names each cell's job.
    The preemption signals (SIGTERM, then submitit's SIGUSR2) reach the first job after
    round 0's first checkpoint: submitit requeues it under the same id and its program
    resumes at round 0, epoch 1. The same sweep command collects both jobs (submitting
    nothing), and both cells, preempted or not, end with the local launcher's summaries;
    once more, the command has nothing to do."""
    argv = ["--launcher", "slurm", "--cpus", "1", "--time", "10"]
    out = work[0] / "slurm"
    code, said, err = run_sweep(work, "slurm", *argv, "--detach", **slurm,
                                RSST_TEST_SLOW_SAVE="1.5")
    assert code == 0, err
    record = json.loads((out / sweep.RECORD).read_text())
    jobs = [c["job"] for c in record["cells"]]
    assert record["launcher"] == "slurm" and all(jobs) and len(set(jobs)) == 2, record
    for cell, job in zip(CELLS, jobs):
        assert f"submitted {cell} as slurm job {job}" in said, said
    # the status command it prints, pasted into a shell in the same folder (no PYTHONPATH)
    printed = said.split("jobs out; ", 1)[1].split(" shows them", 1)[0]
    assert printed == f"{sys.executable} -m experiments.sweep --status slurm", said
    pasted = {k: v for k, v in dict(work[1], **slurm).items() if k != "PYTHONPATH"}
    status = subprocess.run(["bash", "-c", printed], cwd=work[0], env=pasted,
                            capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    for cell, job in zip(CELLS, jobs):
        line = next(x for x in status.stdout.splitlines() if x.strip().startswith(cell))
        assert f"(job {job})" in line and ("queued" in line or "running" in line), status.stdout

    first = out / CELLS[0]
    wait_for("the first checkpoint", lambda: has_checkpoint(first))
    assert ckpt.latest_step(paths.RunPaths.of(first).checkpoints) == 1  # round 0, epoch 1
    for sig in ("TERM", "USR2"):  # a preemption, as submitit's job._interrupt() sends it
        subprocess.run(["scancel", "--signal", sig, jobs[0]], env=dict(os.environ, **slurm),
                       check=True)
    sent = time.time()
    wait_for("the requeued job resuming",
             lambda: "resuming" in paths.RunPaths.of(first).output.read_text(), timeout=120)
    print(f"\nrequeued and resumed {time.time() - sent:.1f} s after the preemption signal")

    code, said, err = run_sweep(work, "slurm", *argv, **slurm)
    assert code == 0, err[-3000:]
    # each job still out is collected (the second may have ended already: then its cell is
    # done); none is submitted again
    assert "submitted" not in said and "2 of 2 cells finished" in said, said
    # the preempted job is collected while it runs, or found done if it already ended
    assert ("seed=0: job" in said and "collecting it" in said) or "seed=0  done" in said, said
    # It resumes where the preempted job's last printed epoch ended: at epoch 1, or at
    # epoch 2 where the signals came while that epoch's checkpoint was in flight (which
    # the job then commits); no epoch is done twice.
    log = paths.RunPaths.of(first).output.read_text()
    assert f"resuming {first.relative_to(work[0])} at {resume_point(log)}" in log, log
    assert "Restarts=1" in subprocess.run(["scontrol", "show", "job", jobs[0]],
                                          env=dict(os.environ, **slurm), capture_output=True,
                                          text=True).stdout
    assert summaries(out) == reference
    record = json.loads((out / sweep.RECORD).read_text())
    assert [c["job"] for c in record["cells"]] == jobs
    assert {c["status"] for c in record["cells"]} <= {"finished", "done"}, record
    code, said, err = run_sweep(work, "slurm", *argv, **slurm)
    assert code == 0 and "submitted" not in said and "2 of 2 cells finished" in said, said


def test_slurm_failed_job_shows_in_status_and_a_rerun_submits_it_again(work, slurm, reference):
    """A program that ends with an error (here exit 75 after its first checkpoint, the
    RSST_JAX_STOP_AFTER hook) fails its cell: exit 1, --status says failed with the last
    line of its log; the same command without the hook submits that cell again, which
    resumes and ends with the local launcher's summary."""
    argv = ["--launcher", "slurm", "--time", "10", "--grid", "seed=0"]
    base = ARGV[:ARGV.index("--grid")] + ["--no-group", "--no_compare"]
    run = lambda **env: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "experiments.sweep", "--out", "slurm_failed", *base, *argv],
        cwd=work[0], env=dict(work[1], **slurm, **env), capture_output=True, text=True, timeout=240)
    failed = run(RSST_JAX_STOP_AFTER="1")
    assert failed.returncode == 1 and "FAILED seed=0 with exit code 75" in failed.stdout, failed
    status = subprocess.run([sys.executable, "-m", "experiments.sweep", "--status", "slurm_failed"],
                            cwd=work[0], env=dict(work[1], **slurm), capture_output=True, text=True)
    cell = work[0] / "slurm_failed" / "seed=0"
    last = [x for x in paths.RunPaths.of(cell).output.read_text().splitlines() if x.strip()][-1]
    assert f"seed=0  failed: {last}" in status.stdout, status.stdout
    again = run()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "submitted seed=0 as slurm job" in again.stdout, again.stdout
    assert "resuming" in paths.RunPaths.of(cell).output.read_text()
    assert strip_times(read_rows(paths.RunPaths.of(cell).summary_json)) == reference["seed=0"]


SLEEPER = "import sys, time\ntime.sleep(float(sys.argv[1]))\nsys.exit(int(sys.argv[2]))\n"


def test_slurm_jobs_through_submitits_api_without_accounting(work, slurm, monkeypatch):
    """The local cluster keeps no accounting (sacct cannot answer): the launcher follows
    its jobs with squeue, reads an exit code through submitit's job.result(), and has
    none for a job cancelled before it wrote one (its cell then fails)."""
    from experiments import launchers
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])
    assert subprocess.run(["sacct", "-n"], capture_output=True).returncode != 0
    assert not launchers.slurm_accounting()
    root = work[0] / "sleepers"
    root.mkdir()
    (root / "sleeper.py").write_text(SLEEPER)
    slurm_launcher = launchers.Slurm(root / "jobs", time_min=5)

    def program(name, seconds, code):
        return launchers.Program(name=name, module="sleeper", args=[str(seconds), str(code)],
                                 env={"PYTHONPATH": str(root)}, cwd=str(root),
                                 logs=[str(root / f"{name}.log")])
    quick, slow = (slurm_launcher.submit(program("quick", 0, 3)),
                   slurm_launcher.submit(program("slow", 120, 0)))
    wait_for("the slow job running", lambda: slurm_launcher.phases([slow])[slow] == "running",
             every=0.2)
    wait_for("the quick job ending", lambda: slurm_launcher.phases([quick])[quick] == "ended",
             every=0.2)
    assert slurm_launcher.outcome(quick) == (3, None)
    subprocess.run(["scancel", slow], check=True)
    wait_for("the cancelled job ending", lambda: slurm_launcher.phases([slow])[slow] == "ended",
             every=0.2)
    assert slurm_launcher.outcome(slow) == (None, None)
    # a job of an earlier command, known only by its id: the same answers
    again = launchers.Slurm(root / "jobs", time_min=5)
    assert again.phases([quick, slow]) == {quick: "ended", slow: "ended"}
    assert again.outcome(quick) == (3, None)


def test_srun_step_of_two_tasks_trains_one_ticket_over_two_processes(slurm, tmp_path):
    """``srun --ntasks 2`` starts experiments.run twice without any process flag: each
    task finds from SLURM's variables that it is one of two (jax.distributed), task 0
    alone prints the run and the summary is that of one process holding two CPU devices.
    The one-process reference runs beside the step (the two cores are shared anyway)."""
    save, out = tmp_path / "srun", tmp_path / "task"
    # JAX derives the coordinator port from the job id, and every test session's cluster
    # counts its jobs from 1: a port of our own keeps two sessions' steps apart.
    env = _env(SLURM_CONF=slurm["SLURM_CONF"], JAX_COORDINATOR_PORT=str(clusters.free_port()))
    start = time.time()
    with ThreadPoolExecutor(1) as pool:
        one = pool.submit(_one, tmp_path / "one", RSST_JAX_CPU_DEVICES="2")
        step = subprocess.run(["srun", "--ntasks", "2", "--nodes", "1", "--time", "5",
                               "--kill-on-bad-exit=1", "--output", f"{out}.%t.out",
                               "--error", f"{out}.%t.err", sys.executable, "-c", _CHILD, *FLAGS,
                               "--save_dir", str(save)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        one = one.result()
    print(f"\nsrun step of two tasks and the one-process run: {time.time() - start:.1f} s")
    said = [pathlib.Path(f"{out}.{t}.out").read_text() for t in (0, 1)]
    errs = [pathlib.Path(f"{out}.{t}.err").read_text()[-2000:] for t in (0, 1)]
    assert step.returncode == 0, (step.stderr[-2000:], errs)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "round 0:" in said[0] and "round 1:" in said[0] and "done:" in said[0], said[0]
    assert "round" not in said[1] and "done:" not in said[1], said[1]  # task 1 is process 1
    assert _numbers(save) == _numbers(tmp_path / "one")
    assert len(_numbers(save)) == 2


# --------------------------------------------------------------------------- Ray


@pytest.fixture(scope="session")
def ray_cluster(work):
    """A Ray head and one worker node, one CPU each: each of two programs lands on its
    own node."""
    missing = clusters.ray_missing()
    if missing:
        pytest.skip(f"no Ray cluster here: {missing}")
    root = work[0] / "ray_cluster"
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
        if "experiments.sweep.program" in args:
            cell = shlex.split(next(a for a in args if a.startswith("--cell="))[len("--cell="):])
            return pathlib.Path(cell[cell.index("--save_dir") + 1]).name
    return ""


def test_ray_task_of_a_lost_worker_node_reruns_on_the_head(work, ray_cluster, reference):
    """Two programs, one per node; the worker node is killed (its raylet and Ray's other
    processes there, SIGKILL) after the first checkpoint of its program: the task runs
    again on the head, resumes, and the summaries are the local launcher's."""
    proc = start_sweep(work, "ray", "--launcher", "ray", "--ray_address", ray_cluster["address"],
                       RSST_TEST_SLOW_SAVE="1.5")
    found = []
    wait_for("a program on the worker node",
             lambda: found.append(_program_on(ray_cluster["root"], "worker")) or found[-1], proc=proc,
             every=0.2)
    cell = work[0] / "ray" / found[-1]
    wait_for("its first checkpoint", lambda: has_checkpoint(cell), proc=proc)
    killed = clusters.kill_ray_node(ray_cluster["root"], "worker")
    assert killed
    sent = time.time()
    wait_for("the task resuming on the head",
             lambda: "resuming" in paths.RunPaths.of(cell).output.read_text(), proc=proc, every=0.1)
    print(f"\nthe lost task resumed on the head {time.time() - sent:.1f} s after its node died")
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    log = paths.RunPaths.of(cell).output.read_text()
    assert f"resuming {cell.relative_to(work[0])} at round 0, epoch" in log, log
    assert summaries(work[0] / "ray") == reference


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_ends_a_sweep_with_each_cells_real_outcome_recorded(work):
    """SIGTERM after the first cell finished and the second checkpointed: exit 130 with
    the resume line, and sweep.json says finished and partial (not new and new)."""
    root, environ = work
    argv = [*ARGV[:3], TINY_BASE + " --pruning_times 1 --epochs 2 --struct none", *ARGV[4:]]
    proc = subprocess.Popen([sys.executable, "-m", "experiments.sweep", "--out", "sigterm", *argv],
                            cwd=root, env=dict(environ, RSST_TEST_SLOW_SAVE="1.0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = work[0] / "sigterm" / "seed=1"
    wait_for("the second cell's first checkpoint", lambda: has_checkpoint(second), proc=proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith(
        f"interrupted; resume with: {paths.python_command(root)} -m experiments.sweep")
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
])
def test_launcher_flags_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, says):
    if "headnode" in extra and importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed")
    code, err = outcome(sweep.main, ["--out", str(tmp_path / "s"), *ARGV[2:], *extra], capsys)
    assert code == 2 and says in one_error_line(err), err


def test_a_ray_address_that_does_not_answer_is_bad_input(tmp_path, capsys, monkeypatch):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed")
    from experiments import launchers
    monkeypatch.setattr(launchers, "RAY_ANSWER_S", 1.0)  # 30 s in use
    address = f"127.0.0.1:{_closed_port()}"
    start = time.time()
    code, err = outcome(sweep.main, ["--out", str(tmp_path / "s"), *ARGV[2:], "--launcher", "ray",
                                     "--ray_address", address], capsys)
    assert code == 2 and f"--ray_address {address}: nothing answered within 1 s" in \
        one_error_line(err), err
    assert time.time() - start < 10


def test_sbatch_options_are_name_value_pairs():
    from experiments import launchers
    assert launchers.parse_sbatch("--account=abc --exclusive --qos='high prio'") == \
        {"account": "abc", "exclusive": True, "qos": "high prio"}
    for bad in ("account=abc", "--account=", "-A abc"):
        with pytest.raises(launchers.LauncherError, match="--sbatch wants sbatch options as --name=value"):
            launchers.parse_sbatch(bad)


def test_slurm_without_sbatch_is_bad_input(tmp_path, capsys, monkeypatch):
    if importlib.util.find_spec("submitit") is None:
        pytest.skip("submitit is not installed")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, srun or squeue there
    code, err = outcome(sweep.main, ["--out", str(tmp_path / "s"), *ARGV[2:], "--launcher", "slurm"],
                        capsys)
    assert code == 2 and "--launcher slurm: sbatch not found" in one_error_line(err), err


def test_a_missing_launcher_package_is_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # what an environment without it sees
    code, err = outcome(sweep.main, ["--out", str(tmp_path / "s"), *ARGV[2:], "--launcher", "slurm"],
                        capsys)
    assert code == 2 and "--launcher slurm needs submitit: pip install" in one_error_line(err), err


def test_the_sweep_commands_of_docs_cluster_parse():
    """Each experiments.sweep command in docs/cluster.md's bash blocks is a valid command
    line of the sweep (argparse exits 2 on an unknown flag)."""
    text = (ROOT / "docs" / "cluster.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```bash\n")[1:]]
    commands = [shlex.split(line.split("#", 1)[0]) for block in blocks
                for line in block.replace("\\\n", " ").splitlines() if "experiments.sweep" in line]
    assert len(commands) == 4, commands
    for argv in commands:
        argv = argv[argv.index("experiments.sweep") + 1:]
        status = any(a == "--status" for a in argv)
        args = sweep.build_parser(status=status).parse_args(argv)
        if not status:
            sweep.check_launcher_flags(args)
