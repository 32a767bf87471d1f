"""A sweep's programs through a launcher (experiments.launchers): one loop for every
launcher, and what the end of a program means for each of its cells."""
from __future__ import annotations

import os
import pathlib
import time
from typing import Callable, Optional, Sequence

from experiments import cli, launchers
from experiments.sweep import programs as program_lib
from experiments.sweep.planning import TODO, Cell, State, classify, complete
from experiments.sweep.record import last_line
from rsst_jax import paths as paths_lib

# Variables a program on another machine gets from the sweep's environment (the rest is
# the node's own: PATH, CUDA_VISIBLE_DEVICES, ...).
FORWARDED = ("JAX_", "XLA_", "RSST_", "TF_CPP_")
ROOT = pathlib.Path(__file__).resolve().parents[2]  # the folder holding experiments/


def _pythonpath() -> str:
    paths = [str(ROOT), os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                       if p]
    return os.pathsep.join(dict.fromkeys(paths))


def program_env(resume: str) -> dict:
    """What a program adds to the environment it runs in (here or on a node)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED)}
    env.update(PYTHONPATH=_pythonpath(), TQDM_DISABLE=os.environ.get("TQDM_DISABLE", "1"))
    env[program_lib.RESUME_ENV] = resume
    return env


def to_program(cells: Sequence[Cell], imports: Sequence[str], resume: str,
               always_resume: bool = False) -> launchers.Program:
    """The command that trains ``cells`` as one program, their run.logs made ready. With
    ``always_resume`` every cell gets --resume, so the same command also continues after
    an interruption (a requeued job, a retried task)."""
    logs = []
    for c in cells:
        c.path.mkdir(parents=True, exist_ok=True)
        logs.append(str(paths_lib.RunPaths.of(c.path).output.resolve()))
    argvs = [cli.config_argv(c.cfg.replace(resume=True)) if always_resume else c.argv
             for c in cells]
    name = cells[0].name if len(cells) == 1 else f"{cells[0].name}+{len(cells) - 1}"
    return launchers.Program(name=name, module=program_lib.MODULE,
                             args=program_lib.arguments(argvs, imports),
                             env=program_env(resume), cwd=os.getcwd(), logs=logs)


def _names(cells: Sequence[Cell]) -> str:
    return ", ".join(c.name for c in cells)


def finish(cells: Sequence[Cell], code: int, seconds: float, log, detail: str) -> None:
    """Each cell of an ended program: finished when its run is complete (a ticket of a
    program can fail while the others finish); interrupted (exit 130: Ctrl-C, SIGTERM,
    a preemption; its checkpoints intact), what its folder says now (partial or new);
    else failed."""
    for cell in cells:
        done = code == 0 or (cell.cfg.run.num_seeds == 1 and complete(cell))
        cell.returncode, cell.seconds = (0 if done else code), round(seconds, 1)
        if not done and code == 130:  # the exit code of an interrupted command
            classify(cell)  # the same command resumes it
            log(f"[sweep] interrupted {cell.name} ({cell.status.value})")
            continue
        cell.move(State.FINISHED if done else State.FAILED)
        if done:
            log(f"[sweep] finished {cell.name} in {seconds:.0f} s")
            continue
        cell.note = detail
        output = paths_lib.RunPaths.of(cell.path).output
        where = f" (see {output})" if output.exists() else ""
        log(f"[sweep] FAILED {cell.name} with exit code {code}{where}"
            + (f": {detail}" if detail else ""))


class Runner:
    """Starts the programs through ``launcher`` as it has room, follows them, and
    finishes their cells; ``record()`` writes OUT/sweep.json after each change."""

    def __init__(self, launcher, imports: Sequence[str], resume: str,
                 record: Callable[[], None] = lambda: None, log=print):
        self.launcher, self.imports, self.resume = launcher, list(imports), resume
        self.record, self.log = record, log
        self.jobs: dict = {}  # job id -> (its cells, when it started)
        self.poll_s = 1.0 if launcher.remote else 0.2

    def collect(self, cells: Sequence[Cell], programs: list, previous: dict) -> list:
        """Take over the jobs that an earlier command of this sweep left queued or
        running (``previous``: the sweep.json it wrote); returns ``programs`` without
        their cells."""
        old = {c["name"]: c.get("job") for c in previous.get("cells", [])}
        for c in cells:  # a cell its job finished since: keep the job's id on record
            if c.status == State.DONE:
                c.job = old.get(c.name)
        waiting = [c for c in cells if c.status in TODO and old.get(c.name)]
        phases = self.launcher.phases([old[c.name] for c in waiting])
        for c in waiting:
            if phases[old[c.name]] != "ended":
                c.move(State(phases[old[c.name]]))
                c.job, c.program = old[c.name], None
                self.jobs.setdefault(c.job, ([], time.time()))[0].append(c)
        for job, (members, _) in self.jobs.items():
            self.log(f"[sweep] {_names(members)}: job {job} is {members[0].status}; "
                     f"collecting it")
        self.record()
        return [p for p in ([c for c in p if c.job is None] for p in programs) if p]

    def start(self, cells: Sequence[Cell]) -> None:
        remote = self.launcher.remote
        if not remote:
            verb = "resuming" if cells[0].status == State.PARTIAL else "running"
            self.log(f"[sweep] {verb} {_names(cells)}" + (
                f" as one program ({len(cells)} tickets)" if len(cells) > 1 else "")
                + self.launcher.next_place())
        program = to_program(cells, self.imports, self.resume, always_resume=remote)
        started = time.time()
        job = self.launcher.submit(program)
        self.jobs[job] = (list(cells), started)
        if remote:
            for c in cells:
                c.move(State.QUEUED)
                c.job = job
            self.log(f"[sweep] submitted {_names(cells)} as {self.launcher.name} job {job}"
                     + (f" (one program, {len(cells)} tickets)" if len(cells) > 1 else ""))
        self.record()

    def poll(self) -> None:
        """Each job's phase; the cells of those that ended finished or failed."""
        changed = False
        for job, phase in self.launcher.phases(list(self.jobs)).items():
            cells, started = self.jobs[job]
            if phase != "ended":
                if self.launcher.remote and cells[0].status != phase:
                    for c in cells:
                        c.move(State(phase))
                    changed = True
                continue
            del self.jobs[job]
            code, error = self.launcher.outcome(job)
            detail = error if error is not None else \
                last_line(paths_lib.RunPaths.of(cells[0].path).output)
            finish(cells, 1 if code is None else code, time.time() - started, self.log, detail)
            changed = True
        if changed:
            self.record()

    def run(self, programs: Sequence[Sequence[Cell]], detach: bool = False,
            status_command: Optional[str] = None) -> bool:
        """Start every program, then (unless ``detach``) wait for each; True where jobs
        are still out (detached)."""
        queue = list(programs)
        while queue or (self.jobs and not detach):
            while queue and self.launcher.room():
                self.start(queue.pop(0))
            if detach and not queue:
                break
            self.poll()
            if self.jobs and not (queue and self.launcher.room()):
                time.sleep(self.poll_s)
        if detach and self.jobs:
            self.log(f"[sweep] {len(self.jobs)} jobs out; {status_command} shows them, the "
                     f"same sweep command collects them")
        return detach and bool(self.jobs)

    def interrupted(self, cells: Sequence[Cell]) -> None:
        """Ctrl-C or SIGTERM: stop what runs here, then look at the unfinished cells
        again (their folders say where they are now) and record them."""
        self.launcher.stop()
        for c in cells:
            if c.status in TODO and c.job is None:
                classify(c)
        self.record()


__all__ = ["Runner", "to_program", "program_env", "finish", "FORWARDED"]
