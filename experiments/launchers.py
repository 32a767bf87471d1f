"""Where a sweep's programs run: in this process, in child processes, as SLURM jobs
(through submitit) or as Ray tasks, four launchers behind one small interface.

A launcher gets :class:`Program` s, each a command (``python -m MODULE ARGS``) with the
environment variables it adds, the folder it runs in and the log files its output is
appended to, and runs them somewhere. It knows nothing of what the commands do: the
sweep decides what to run (experiments.sweep), the launcher decides where. A program
that is interrupted (a preempted or timed-out job, a task whose node died) is simply run
again; the command resumes its runs from their newest checkpoints, so it ends as if
never interrupted.

Every launcher has::

    name                  what OUT/sweep.json records ("local" for the first two)
    remote                True where programs outlive a Ctrl-C of the sweep or run elsewhere
    room() -> bool        whether another program may start now
    next_place() -> str   where the next program would run, for the sweep's line ('' if
                          nothing to say, ' on device 1' for a child with its own GPU)
    submit(program) -> str            start it (in process: run it); its id
    phases(ids) -> {id: phase}        queued, running or ended
    outcome(id) -> (code, error)      of an ended program: its exit code (None where it
                                      left none) and the error it raised here in one
                                      line (None: its log's last line says what happened)
    stop()                Ctrl-C: stop what this process runs, each keeping its checkpoint
"""
from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Optional, Sequence

# Scheduler states of a job that has not ended (squeue's %T, sacct's State).
SLURM_WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                 "SUSPENDED", "RESV_DEL_HOLD", "SPECIAL_EXIT", "PREEMPTED"}
SLURM_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING", "STOPPED"}
RAY_ANSWER_S = 30.0  # how long a Ray address may take to answer


class LauncherError(ValueError):
    """A launcher cannot be used as asked; the message says what to do (exit code 2)."""


@dataclasses.dataclass
class Program:
    """One command to run somewhere, ``python -m module *args``: the variables it adds to
    the environment of wherever it runs, the folder it runs in and the files its output
    is appended to."""
    name: str
    module: str
    args: list
    env: dict
    cwd: str
    logs: list
    python: str = sys.executable  # the same path on every node (docs/cluster.md)

    @property
    def argv(self) -> list[str]:
        return [self.python, "-m", self.module, *self.args]


# --------------------------------------------------------------------------- processes


def copy_output(stream, files: Sequence, echo: bool = False) -> None:
    """A child's output, line by line, into each of ``files`` (open for appending in
    binary) and, with ``echo``, this process's stdout (a job's or task's own log)."""
    for line in iter(stream.readline, b""):
        for f in files:
            f.write(line)
            f.flush()
        if echo:
            try:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
            except (AttributeError, OSError, ValueError):
                pass
    stream.close()


def stop_grace() -> float:
    """Seconds a stopped program gets before SIGKILL: the checkpoint write in flight
    commits within ``rsst_jax.checkpoint.WRITE_GRACE_S``, then 2 s to exit."""
    from rsst_jax.checkpoint import WRITE_GRACE_S  # start-up: a job's wrapper loads no JAX
    return WRITE_GRACE_S + 2.0


def interrupt(procs: Sequence[subprocess.Popen], wait: float) -> None:
    """SIGINT each process (a program ends within a second or two, its checkpoint
    intact); SIGKILL what still runs after ``wait`` seconds. Polls, never ``wait()``s:
    it may run inside a signal handler of a thread that polls the same process."""
    procs = [p for p in procs if p.poll() is None]
    for proc in procs:
        try:
            proc.send_signal(signal.SIGINT)
        except OSError:
            pass
    deadline = time.time() + wait
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.05)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()


def _die_with_parent() -> None:
    """In the child: SIGKILL when the process that started it dies (a Ray worker killed
    with its node must not leave its program running and holding the run lock); SIGUSR2,
    SLURM's warning before the time limit, left to submitit in the parent, which stops
    the command with SIGINT."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ProgramCall:
    """Runs a :class:`Program` where it is called (a SLURM job, a Ray task) and returns
    its exit code. For submitit it is checkpointable: on the preemption or time-limit
    signal, ``checkpoint`` stops the command (it keeps its newest checkpoint) and hands
    submitit the same call to requeue, which runs the command again."""

    def __init__(self, program: Program):
        self.program = program
        self._proc: Optional[subprocess.Popen] = None

    def __getstate__(self):
        return {"program": self.program}

    def __setstate__(self, state):
        self.program, self._proc = state["program"], None

    def __call__(self) -> int:
        p = self.program
        files = [open(path, "ab") for path in p.logs]
        try:
            self._proc = subprocess.Popen(p.argv, cwd=p.cwd if os.path.isdir(p.cwd) else None,
                                          env=dict(os.environ, **p.env), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
            copy = threading.Thread(target=copy_output, args=(self._proc.stdout, files, True),
                                    daemon=True)
            copy.start()
            # poll, never wait(): checkpoint() below runs inside a signal handler of this
            # thread and polls the same process.
            while self._proc.poll() is None:
                time.sleep(0.2)
            copy.join(timeout=5)
            code = self._proc.returncode
            if code == 130 or code < 0:
                # Ended by a signal: a preemption's SIGTERM comes just before the requeue
                # signal; give submitit's handler a moment to requeue instead of ending.
                time.sleep(5)
            return code
        finally:
            for f in files:
                f.close()

    def checkpoint(self, *args, **kwargs):
        """submitit's preemption and time-limit hook: stop, then requeue the same call."""
        import submitit  # start-up: optional (rsst-jax[cluster]); in a SLURM job only
        if self._proc is not None:  # its checkpoint in flight commits within the grace
            interrupt([self._proc], wait=stop_grace())
        return submitit.helpers.DelayedSubmission(ProgramCall(self.program))


# --------------------------------------------------------------------------- here


class InProcess:
    """Each program in this process, one after another (no start-up cost per program):
    ``run(program.args)`` returns its exit code and the error it raised, in one line."""
    name, remote = "local", False

    def __init__(self, run: Callable[[Sequence[str]], tuple]):
        self.run = run
        self.ended: dict = {}  # id -> (exit code, error), until ``outcome`` takes it
        self.count = 0

    def room(self) -> bool:
        return not self.ended  # the next program once the sweep has seen this one end

    def next_place(self) -> str:
        return ""

    def submit(self, program: Program) -> str:
        self.count += 1
        job = str(self.count)
        self.ended[job] = self.run(program.args)
        return job

    def phases(self, job_ids: Sequence[str]) -> dict:
        return {j: "ended" for j in job_ids}

    def outcome(self, job_id: str) -> tuple:
        return self.ended.pop(job_id)

    def stop(self) -> None:
        pass  # Ctrl-C ends this process, and the program with it


class Subprocesses:
    """Each program a child process, at most ``parallel`` at once; with ``devices``, each
    child sees one of them (CUDA_VISIBLE_DEVICES), in turn by slot."""
    name, remote = "local", False

    def __init__(self, parallel: int = 1, devices: Sequence[str] = ()):
        self.devices = list(devices)
        self.free = list(range(parallel))
        self.active: dict = {}  # id -> (Popen, copying thread, slot)
        self.count = 0

    def room(self) -> bool:
        return bool(self.free)

    def _device(self, slot: int) -> Optional[str]:
        return self.devices[slot % len(self.devices)] if self.devices else None

    def next_place(self) -> str:
        device = self._device(self.free[0]) if self.free else None
        return f" on device {device}" if device else ""

    def submit(self, program: Program) -> str:
        slot = self.free.pop(0)
        env = dict(os.environ, **program.env)
        if self._device(slot) is not None:
            env["CUDA_VISIBLE_DEVICES"] = self._device(slot)
        proc = subprocess.Popen(program.argv, cwd=program.cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        files = [open(p, "ab") for p in program.logs]
        copy = threading.Thread(target=self._copy, args=(proc.stdout, files), daemon=True)
        copy.start()
        self.count += 1
        job = str(self.count)
        self.active[job] = (proc, copy, slot)
        return job

    @staticmethod
    def _copy(stream, files) -> None:
        try:
            copy_output(stream, files)
        finally:
            for f in files:
                f.close()

    def phases(self, job_ids: Sequence[str]) -> dict:
        return {j: "running" if j in self.active and self.active[j][0].poll() is None
                else "ended" for j in job_ids}

    def outcome(self, job_id: str) -> tuple:
        proc, copy, slot = self.active.pop(job_id)
        copy.join()  # its last lines are in the logs before the sweep reads them
        self.free.append(slot)
        return proc.returncode, None

    def stop(self, wait: Optional[float] = None) -> None:
        """Ctrl-C or SIGTERM: interrupt the children, each committing the checkpoint it is
        writing (they end within a second when none is in flight), and kill what still
        runs after ``wait`` seconds (default: the checkpoints' grace and 2 s more)."""
        interrupt([proc for proc, _, _ in self.active.values()],
                  stop_grace() if wait is None else wait)
        for _, copy, _ in self.active.values():  # their last lines into the run.logs
            copy.join(timeout=0.5)


# --------------------------------------------------------------------------- SLURM


def parse_sbatch(text: str) -> dict:
    """``--name=value --flag`` -> {"name": "value", "flag": True} (submitit's
    ``additional_parameters``, written as ``#SBATCH`` lines)."""
    try:
        tokens = shlex.split(text)
    except ValueError as e:
        raise LauncherError(f"--sbatch: cannot split the options ({e})") from None
    options = {}
    for tok in tokens:
        name, sep, value = tok.partition("=")
        if not name.startswith("--") or len(name) < 3 or (sep and not value):
            raise LauncherError(f"--sbatch wants sbatch options as --name=value or --flag "
                                f"(e.g. --sbatch '--account=abc --qos=high'), got {tok!r}")
        options[name[2:]] = value if sep else True
    return options


def slurm_states(job_ids: Sequence[str]) -> dict:
    """{job id: squeue's state} for the jobs the controller still knows (a job it has
    forgotten is missing); {} where squeue cannot answer."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids or not shutil.which("squeue"):
        return {}
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i %T"],
                         capture_output=True, text=True, timeout=60)
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def job_phase(state: Optional[str]) -> str:
    """queued, running or ended, from a squeue or sacct state (None: the job is
    forgotten; 'CANCELLED by 0': its first word counts)."""
    state = state.split()[0] if state else None
    if state in SLURM_WAITING:
        return "queued"
    if state in SLURM_RUNNING:
        return "running"
    return "ended"


def slurm_accounting() -> bool:
    """Whether the cluster keeps job accounting, so that ``sacct`` (which submitit asks
    for a job's state) answers: scontrol's AccountingStorageType is not
    accounting_storage/none."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    found = re.search(r"^AccountingStorageType\s*=\s*(\S+)", out.stdout, re.MULTILINE)
    return bool(found) and found.group(1) != "accounting_storage/none"


def slurm_job(folder: pathlib.Path, job_id: str):
    """submitit's handle of job ``job_id`` whose files are in ``folder/<job id>/``."""
    import submitit  # start-up: optional (rsst-jax[cluster]); SLURM sweeps only
    return submitit.SlurmJob(folder=pathlib.Path(folder) / "%j", job_id=str(job_id))


def slurm_phases(folder: pathlib.Path, job_ids: Sequence[str], jobs: Optional[dict] = None,
                 accounting: Optional[bool] = None) -> dict:
    """{job id: queued, running or ended}. Where the cluster keeps accounting, submitit
    says (``job.done()``: its result is written or sacct says it ended; ``job.state``
    for the rest); where it keeps none (``slurm_accounting``, e.g. a cluster without
    slurmdbd) or sacct does not know the job yet, squeue does, and a job it has
    forgotten (``MinJobAge`` after its end) has ended. ``jobs``: submitit's handles
    already made, by id."""
    jobs = {} if jobs is None else jobs
    accounting = slurm_accounting() if accounting is None else accounting
    phases = {}
    if accounting and importlib.util.find_spec("submitit") is not None:
        for j in job_ids:
            if j not in jobs:
                jobs[j] = slurm_job(folder, j)
            if jobs[j].done():
                phases[j] = "ended"
            elif jobs[j].state.split()[0] != "UNKNOWN":  # UNKNOWN: sacct has no line yet
                phases[j] = job_phase(jobs[j].state)
    rest = [j for j in job_ids if j not in phases]
    states = slurm_states(rest)
    phases.update({j: job_phase(states.get(str(j))) for j in rest})
    return phases


class Slurm:
    """Each program one sbatch job through submitit, requeued (and resumed) when it is
    preempted or reaches its time limit; the jobs' own logs go to ``folder``."""
    name, remote = "slurm", True

    def __init__(self, folder, partition: Optional[str] = None, gpus: int = 0, cpus: int = 1,
                 mem: Optional[str] = None, time_min: int = 240, sbatch: str = "",
                 requeues: int = 20):
        if importlib.util.find_spec("submitit") is None:  # imported once the input is good
            raise LauncherError("--launcher slurm needs submitit: pip install "
                                "'rsst-jax[cluster]' (or pip install submitit)")
        for program in ("sbatch", "srun", "squeue"):
            if not shutil.which(program):
                raise LauncherError(f"--launcher slurm: {program} not found; run the sweep "
                                    f"where SLURM's commands are (a login node), or use "
                                    f"--launcher local")
        extra = parse_sbatch(sbatch)
        import submitit  # start-up: optional; imported once find_spec above found it
        if mem:
            extra["mem"] = mem
        self.folder = pathlib.Path(folder).resolve()
        self.executor = submitit.SlurmExecutor(folder=str(self.folder / "%j"),
                                               max_num_timeout=requeues)
        params = dict(time=int(time_min), cpus_per_task=int(cpus), additional_parameters=extra)
        if partition:
            params["partition"] = partition
        if gpus:
            params["gpus_per_node"] = int(gpus)
        self.executor.update_parameters(**params)
        self.jobs: dict = {}  # id -> submitit's SlurmJob
        self.accounting = slurm_accounting()

    def room(self) -> bool:
        return True

    def next_place(self) -> str:
        return ""

    def submit(self, program: Program) -> str:
        self.executor.update_parameters(job_name=program.name[:60])
        job = self.executor.submit(ProgramCall(program))
        self.jobs[str(job.job_id)] = job
        return str(job.job_id)

    def phases(self, job_ids: Sequence[str]) -> dict:
        return slurm_phases(self.folder, job_ids, self.jobs, self.accounting)

    def outcome(self, job_id: str) -> tuple:
        """The command's exit code where the job left its result (``job.result()``);
        None where it ended without one (cancelled, killed, its requeues spent)."""
        if job_id not in self.jobs:  # a job of an earlier sweep command
            self.jobs[job_id] = slurm_job(self.folder, job_id)
        job = self.jobs[job_id]
        # Without accounting, job.done() would ask sacct (an error on stderr each time)
        # and never say done for a job that left no result: the result's path decides.
        left = job.done() if self.accounting else job.paths.result_pickle.exists()
        if not left:
            return None, None
        try:
            value = job.result()
        except Exception:  # noqa: BLE001  submitit's FailedJobError or UncompletedJobError
            return None, None
        return (value if isinstance(value, int) else 1), None

    def stop(self) -> None:
        pass  # the jobs run on; the same sweep command collects them


# --------------------------------------------------------------------------- Ray


def _answers(address: str, timeout: float) -> bool:
    host, _, port = address.rpartition(":")
    deadline = time.time() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.5, deadline - time.time())):
                return True
        except OSError:
            if time.time() >= deadline:
                return False
            time.sleep(0.5)


class Ray:
    """Each program one task of a running Ray cluster, with ``gpus`` and ``cpus``; a task
    lost with its node runs again on another (up to ``retries`` times) and resumes from
    the checkpoints on the shared file system. The tasks end with the sweep."""
    name, remote = "ray", True

    def __init__(self, address: str, gpus: float = 0, cpus: float = 1, retries: int = 3,
                 answer_s: Optional[float] = None):
        if importlib.util.find_spec("ray") is None:  # imported below, once the address answers
            raise LauncherError("--launcher ray needs ray: pip install 'rsst-jax[cluster]' "
                                "(or pip install ray)")
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise LauncherError(f"--ray_address wants HOST:PORT of the cluster's head (ray start "
                                f"--head prints it), got {address!r}")
        answer_s = RAY_ANSWER_S if answer_s is None else answer_s
        if not _answers(address, answer_s):
            raise LauncherError(f"--ray_address {address}: nothing answered within "
                                f"{answer_s:.0f} s; start the cluster (ray start --head) or "
                                f"correct the address")
        import ray  # start-up: optional (rsst-jax[cluster]), 0.2 s; Ray sweeps only
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        self.ray = ray
        self.remote_call = ray.remote(_run_task).options(
            num_cpus=cpus, num_gpus=gpus, max_retries=retries, retry_exceptions=False)
        self.refs: dict = {}

    def room(self) -> bool:
        return True

    def next_place(self) -> str:
        return ""

    def submit(self, program: Program) -> str:
        ref = self.remote_call.remote(ProgramCall(program))
        task_id = ref.task_id().hex()[:16]
        self.refs[task_id] = ref
        return task_id

    def phases(self, task_ids: Sequence[str]) -> dict:
        refs = [self.refs[t] for t in task_ids if t in self.refs]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
        done = {r.task_id().hex()[:16] for r in ready}
        return {t: ("ended" if t in done or t not in self.refs else "running") for t in task_ids}

    def outcome(self, task_id: str) -> tuple:
        try:
            return int(self.ray.get(self.refs[task_id])), None
        except Exception:  # noqa: BLE001  a task that failed for good (its retries spent)
            return None, None

    def stop(self) -> None:
        pass  # the tasks end with this process, their driver


def _run_task(call: ProgramCall) -> int:
    return call()


__all__ = ["Program", "ProgramCall", "InProcess", "Subprocesses", "Slurm", "Ray",
           "LauncherError", "parse_sbatch", "slurm_states", "slurm_phases", "slurm_accounting",
           "job_phase", "copy_output", "interrupt"]
