"""Where a sweep's programs run: SLURM jobs (submitit) or Ray tasks.

A launcher gets :class:`Program` s, each a command line with the environment variables
it adds, the folder it runs in and the log files its output is appended to, and runs
them somewhere. It knows nothing of what the commands do: the sweep decides what to run
(experiments.sweep), the launcher decides where. A program that is interrupted (a
preempted or timed-out job, a task whose node died) is simply run again; the command
resumes its runs from their newest checkpoints, so it ends as if never interrupted.

The sweep's own default, programs in child processes of the sweep, lives in
experiments.sweep (``Subprocesses``).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

# Scheduler states of a job that has not ended (squeue's %T).
SLURM_WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                 "SUSPENDED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
SLURM_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING", "STOPPED"}
RAY_ANSWER_S = 30.0  # how long a Ray address may take to answer


class LauncherError(ValueError):
    """A launcher cannot be used as asked; the message says what to do (exit code 2)."""


@dataclasses.dataclass
class Program:
    """One command to run somewhere: ``argv``, the variables it adds to the environment
    of wherever it runs, the folder it runs in and the files its output is appended to."""
    name: str
    argv: list
    env: dict
    cwd: str
    logs: list


# --------------------------------------------------------------------------- on the node


def _die_with_parent() -> None:
    """In the child: SIGKILL when the process that started it dies (a Ray worker killed
    with its node must not leave its program running and holding the run lock); SIGUSR2,
    SLURM's warning before the time limit, left to submitit in the parent, which stops
    the command with SIGINT."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        import ctypes
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
        env = dict(os.environ, **p.env)
        files = [open(path, "ab") for path in p.logs]
        try:
            self._proc = subprocess.Popen(p.argv, cwd=p.cwd if os.path.isdir(p.cwd) else None,
                                          env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
            copy = threading.Thread(target=_copy, args=(self._proc.stdout, files), daemon=True)
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

    def stop(self, wait: float = 10.0) -> None:
        """SIGINT the command (it ends within a second or two, its checkpoint intact);
        SIGKILL after ``wait`` seconds."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        deadline = time.time() + wait
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()

    def checkpoint(self, *args, **kwargs):
        """submitit's preemption and time-limit hook: stop, then requeue the same call."""
        import submitit
        self.stop()
        return submitit.helpers.DelayedSubmission(ProgramCall(self.program))


def _copy(stream, files) -> None:
    """The command's output, line by line, into each log file and this process's stdout
    (the job's or task's own log)."""
    for line in iter(stream.readline, b""):
        for f in files:
            f.write(line)
            f.flush()
        try:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
        except (AttributeError, OSError, ValueError):
            pass
    stream.close()


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
    """queued, running or ended, from a squeue state (None: the job is forgotten)."""
    if state in SLURM_WAITING:
        return "queued"
    if state in SLURM_RUNNING:
        return "running"
    return "ended"


class Slurm:
    """Each program one sbatch job through submitit, requeued (and resumed) when it is
    preempted or reaches its time limit; the jobs' own logs go to ``folder``."""
    name = "slurm"

    def __init__(self, folder, partition: Optional[str] = None, gpus: int = 0, cpus: int = 1,
                 mem: Optional[str] = None, time_min: int = 240, sbatch: str = "",
                 requeues: int = 20):
        import importlib.util
        if importlib.util.find_spec("submitit") is None:  # imported once the input is good
            raise LauncherError("--launcher slurm needs submitit: pip install "
                                "'rsst-jax[cluster]' (or pip install submitit)")
        for program in ("sbatch", "srun", "squeue"):
            if not shutil.which(program):
                raise LauncherError(f"--launcher slurm: {program} not found; run the sweep "
                                    f"where SLURM's commands are (a login node), or use "
                                    f"--launcher local")
        extra = parse_sbatch(sbatch)
        import submitit
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

    def submit(self, program: Program) -> str:
        self.executor.update_parameters(job_name=program.name[:60])
        job = self.executor.submit(ProgramCall(program))
        return str(job.job_id)

    def phases(self, job_ids: Sequence[str]) -> dict:
        states = slurm_states(job_ids)
        return {j: job_phase(states.get(str(j))) for j in job_ids}

    def exit_code(self, job_id: str) -> Optional[int]:
        """The command's exit code where the job wrote its result (None: it did not)."""
        import pickle
        path = self.folder / str(job_id) / f"{job_id}_0_result.pkl"
        try:
            with open(path, "rb") as f:
                outcome, value = pickle.load(f)
        except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError):
            return None
        return value if outcome == "success" and isinstance(value, int) else 1

    def log_of(self, job_id: str) -> pathlib.Path:
        return self.folder / str(job_id) / f"{job_id}_0_log.err"


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
    the checkpoints on the shared file system."""
    name = "ray"

    def __init__(self, address: str, gpus: float = 0, cpus: float = 1, retries: int = 3,
                 answer_s: Optional[float] = None):
        import importlib.util
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
        import ray
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        self.ray = ray
        self.remote = ray.remote(_run_task).options(
            num_cpus=cpus, num_gpus=gpus, max_retries=retries, retry_exceptions=False)
        self.refs: dict = {}

    def submit(self, program: Program) -> str:
        ref = self.remote.remote(ProgramCall(program))
        task_id = ref.task_id().hex()[:16]
        self.refs[task_id] = ref
        return task_id

    def phases(self, task_ids: Sequence[str]) -> dict:
        refs = [self.refs[t] for t in task_ids if t in self.refs]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
        done = {r.task_id().hex()[:16] for r in ready}
        return {t: ("ended" if t in done or t not in self.refs else "running") for t in task_ids}

    def exit_code(self, task_id: str) -> Optional[int]:
        try:
            return int(self.ray.get(self.refs[task_id]))
        except Exception:  # noqa: BLE001  a task that failed for good (its retries spent)
            return None


def _run_task(call: ProgramCall) -> int:
    return call()


__all__ = ["Program", "ProgramCall", "Slurm", "Ray", "LauncherError", "parse_sbatch",
           "slurm_states", "job_phase"]
