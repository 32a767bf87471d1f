r"""Run a grid of runs, then compare them: python -m experiments.sweep.

Example (IMP vs Refill vs RSST, two seeds each, 3 x 2 = 6 cells):

    python -m experiments.sweep --out results/methods \
        --base "--dataset digits --arch res20s --epochs 2 --warmup 0 --pruning_times 3" \
        --grid struct=none,refill,rsst --grid seed=0,1

Cells are the product of the --grid KEY=V1,V2 axes (times the named --variant flag
sets, if any). The --base flags are read once into a configuration of experiments.run;
a cell is that configuration with the variant's flags, then the cell's values (which
win), and its own run directory OUT/<cell name>, named after the cell's values, e.g.
OUT/struct=rsst,criteria=l1. A cell whose summary already has all its rounds is
skipped; one with checkpoints but unfinished is resumed; one whose saved configuration
differs from what the sweep would run now is refused (delete it or choose another
--out). Finally experiments.compare writes OUT/comparison.csv, .md and .png over all
finished cells; OUT/sweep.json records the plan, each cell's command and outcome.

Cells that differ only in settings that tickets of one compiled program may differ in
(seed, lr, rate, rate_schedule, fillback_rate, criteria, the lambda schedule, its scale,
exponents and cap: the flags declared groupable, rsst_jax.config.names_where(groupable=True))
train together as one program,
each still writing its own ordinary run directory; --no-group trains one program per
cell. New and unfinished cells never share a program.

Programs run one after another in subprocesses (default; a crash stays in its program,
the output goes to OUT/<cell>/run.log of each of its cells), --parallel N at a time
(--devices 0,1 gives each its own GPU through CUDA_VISIBLE_DEVICES), or all in this
process (--mode inprocess: no start-up cost per program). --import MODULE imports your
module first, so a network, criterion or method registered there is available to every
cell.
Ctrl-C (or SIGTERM) stops the sweep and its cells within a second or two, OUT/sweep.json
keeping each cell's outcome; the same command resumes.

--launcher slurm runs each program as one SLURM job (through submitit), --launcher ray as
one task of a running Ray cluster (--ray_address); both need pip install
'rsst-jax[cluster]' and a file system the sweep and the nodes share. A job that is
preempted or reaches its time limit is requeued, a task whose node died runs again
elsewhere; either way the program resumes its cells from their newest checkpoints.
With --detach the sweep submits the jobs and returns; --status OUT shows each cell (done,
running or queued with its job id, failed with the last line of its log); the same sweep
command again collects what finished and submits only what is missing (docs/cluster.md).

Exit codes: 0 every cell finished, 1 some cell failed, 2 bad input, 130 interrupted.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import itertools
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Optional, Sequence

from experiments import cli
from experiments import compare as compare_cmd
from rsst_jax import config as config_lib
from rsst_jax import paths as paths_lib
from rsst_jax import runs as runs_lib

# Settings a sweep sets itself, per cell (--base may name a --config file).
RESERVED = ("save_dir", "resume", "checkpoint", "dry_run", "config")
RECORD = "sweep.json"
COMPARISON = "comparison"
RESUME_ENV = "RSST_JAX_SWEEP_RESUME"  # the sweep's command, for its cells' Ctrl-C line


class SweepError(cli.BadInput):
    """Bad sweep input; the message says what to change."""


@dataclasses.dataclass
class Cell:
    name: str
    values: dict                    # flag -> value as given on the command line, in axis order
    cfg: Any                        # its validated rsst_jax.config.Config (save_dir = path)
    path: pathlib.Path
    status: str = "new"             # new | partial | done | stale | finished | failed
    #                                 (| queued | running: a launcher's job has it)
    returncode: Optional[int] = None
    seconds: Optional[float] = None
    note: str = ""
    program: Optional[int] = None   # the training call it is part of (cells of one share it)
    resume_step: Optional[int] = None
    job: Optional[str] = None       # the SLURM job or Ray task that trains it (a launcher's)

    def run_config(self):
        """The configuration the cell runs with now (``--resume`` when it is unfinished)."""
        return self.cfg.replace(resume=self.status == "partial")

    @property
    def argv(self) -> list[str]:
        """The experiments.run command line of the cell as it runs now."""
        return cli.config_argv(self.run_config())

    @property
    def command(self) -> str:
        """The cell's command, with the ``--import`` its network, criterion or method needs."""
        from rsst_jax import config as config_lib
        imports = [x for m in config_lib.plugin_modules(self.cfg) for x in ("--import", m)]
        return "python -m experiments.run " + shlex.join(imports + self.argv)


# --------------------------------------------------------------------------- planning


def parse_axis(text: str, known: Sequence[str]) -> tuple[str, list[str]]:
    """``KEY=V1,V2`` (or ``KEY=V1|V2`` when values contain commas) -> (key, values)."""
    key, sep, rest = text.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise SweepError(f"--grid wants KEY=V1,V2,... (e.g. struct=none,refill,rsst), got {text!r}")
    if key not in known:
        close = difflib.get_close_matches(key, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise SweepError(f"--grid {key}: experiments.run has no flag --{key}{hint}")
    if key in RESERVED:
        raise SweepError(f"--grid {key}: the sweep sets --{key} itself")
    values = [v.strip() for v in rest.split("|" if "|" in rest else ",")]
    if not rest.strip() or any(not v for v in values):
        raise SweepError(f"--grid {text!r} has an empty value; list them as {key}=V1,V2")
    if len(set(values)) != len(values):
        raise SweepError(f"--grid {text!r} repeats a value")
    return key, values


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME=FLAGS`` -> (name, argv)."""
    name, sep, flags = text.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        raise SweepError(f"--variant wants NAME='--flag value ...' with a plain NAME "
                         f"(letters, digits, . _ + -), got {text!r}")
    try:
        argv = shlex.split(flags)
    except ValueError as e:
        raise SweepError(f"--variant {name}: cannot split its flags ({e})") from None
    return name, argv


def _safe(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+^-]", "_", value.replace(",", "+"))


def cell_name(values: dict, variant: Optional[str]) -> str:
    parts = ([f"variant={variant}"] if variant else []) + [f"{k}={_safe(v)}" for k, v in values.items()]
    return ",".join(parts)


def _given(argv: Sequence[str], where: str, allowed: Sequence[str] = ()) -> dict:
    """The experiments.run flags ``argv`` sets (typed); none of RESERVED but ``allowed``."""
    try:
        given = cli.explicit_values(argv)
    except config_lib.ConfigError as e:
        raise SweepError(f"{where}: {cli.one_line(e)}") from None
    for flag in given:
        if flag in RESERVED and flag not in allowed:
            raise SweepError(f"{where} must not set --{flag}: the sweep chooses it per cell")
    return given


def plan(out: pathlib.Path, base: Sequence[str], grids: Sequence[str],
         variants: Sequence[str]) -> list[Cell]:
    """The cells of the sweep, each with its validated configuration: ``base`` (flags of
    experiments.run, a --config file allowed) read once, then per cell the variant's
    flags and the grid values put in."""
    if not grids and not variants:
        raise SweepError("empty sweep: give at least one --grid KEY=V1,V2 or --variant NAME='FLAGS'")
    out = pathlib.Path(out)
    axes = [parse_axis(g, config_lib.flag_names()) for g in grids]
    keys = [k for k, _ in axes]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise SweepError(f"--grid {dup[0]} is given twice; list all its values in one --grid")
    typed = {}
    for key, texts in axes:
        try:
            typed[key] = {t: cli.flag_value(key, t) for t in texts}
        except config_lib.ConfigError as e:
            raise SweepError(f"--grid {key}: {cli.one_line(e)}") from None
    named = [parse_variant(v) for v in variants]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise SweepError("two --variant have the same NAME")
    _given(base, "--base", allowed=("config",))
    try:
        base_values = cli.parse_run_values(base)
    except config_lib.ConfigError as e:
        raise SweepError(f"--base: {cli.one_line(e)}") from None
    variant_values = {n: _given(argv, f"--variant {n}") for n, argv in named}
    cells = []
    for vname in (names or [None]):
        for combo in itertools.product(*[texts for _, texts in axes]):
            values = dict(zip(keys, combo))
            name = cell_name(values, vname)
            flat = {**base_values, **variant_values.get(vname, {}),
                    **{k: typed[k][t] for k, t in values.items()}, "save_dir": str(out / name)}
            try:
                cfg = config_lib.validate(config_lib.Config.from_dict(flat))
            except config_lib.ConfigError as e:
                raise SweepError(f"cell {name}: {cli.one_line(e)}") from None
            cells.append(Cell(name=name, values=values, cfg=cfg, path=out / name))
    seen = {}
    for c in cells:
        if c.name in seen:
            raise SweepError(f"cells {seen[c.name]!r} and {c.name!r} get the same folder name")
        seen[c.name] = c.name
    return cells


def summary_rows(path: pathlib.Path) -> int:
    """Rounds finished in the run directory ``path`` (0 where it has none yet)."""
    try:
        return len(runs_lib.load_run(path, need_summary=False).summary)
    except runs_lib.RunDirError:
        return 0


def classify(cell: Cell) -> None:
    """Set ``cell.status``: new, partial (resume it), done (skip it) or stale (refuse)."""
    from rsst_jax import checkpoint as ckpt

    run = paths_lib.RunPaths.of(cell.path)
    if not cell.path.exists() or not any(cell.path.iterdir()):
        cell.status = "new"
        return
    if run.config.is_file():
        try:
            saved = json.loads(run.config.read_text())
        except json.JSONDecodeError:
            saved = {}
        listed = config_lib.semantic_diffs(
            saved, dict(cell.cfg.to_dict(), seed=cell.cfg.run.resolved_seed), limit=4)
        if listed:
            cell.status = "stale"
            cell.note = ("was run with different flags: " + listed
                         + "; delete the folder or choose another --out")
            return
    cell.resume_step = ckpt.latest_step(run.checkpoints)
    if summary_rows(cell.path) >= cell.cfg.prune.pruning_times:
        cell.status = "done"
    elif cell.resume_step is not None:
        cell.status = "partial"
    else:
        cell.status = "new"


def _program_key(cfg) -> tuple:
    """What cells trained as one program must share: every flag not declared groupable."""
    from rsst_jax import config as config_lib
    groupable = set(config_lib.names_where(groupable=True))
    return tuple((k, v) for k, v in cfg.to_dict().items() if k not in groupable)


def plan_programs(cells: Sequence[Cell], grouped: bool = True) -> list[list[Cell]]:
    """The training calls of the cells still to run: with ``grouped``, cells that may
    train as one program (same status, settings differing only in groupable ones, and
    for unfinished cells newest checkpoints at most one step apart) share one; cells with
    --num_seeds > 1 (one program of their own already) never share. Sets
    ``cell.program``."""
    todo = [c for c in cells if c.status in ("new", "partial")]
    if not grouped:
        programs = [[c] for c in todo]
    else:
        by_key: dict = {}
        for c in todo:
            # --num_seeds > 1 is a program of its own; --distill trains one ticket a program
            alone = c.name if c.cfg.run.num_seeds > 1 or c.cfg.optim.distill else None
            by_key.setdefault((c.status, alone, _program_key(c.cfg)), []).append(c)
        programs = []
        for (status, _, _), members in by_key.items():
            if status != "partial":
                programs.append(members)
                continue
            # The driver resumes the tickets of a program at the older of their newest
            # checkpoints (it keeps two): a kill may leave one ticket a step behind.
            members = sorted(members, key=lambda c: c.resume_step)
            start = 0
            for i in range(1, len(members) + 1):
                if i == len(members) or members[i].resume_step - members[start].resume_step > 1:
                    programs.append(members[start:i])
                    start = i
        order = {id(c): i for i, c in enumerate(todo)}
        programs.sort(key=lambda p: min(order[id(c)] for c in p))
    for i, program in enumerate(programs):
        for c in program:
            c.program = i
    return programs


# --------------------------------------------------------------------------- running


def program_configs(program: Sequence[Cell]) -> list:
    """The configurations one training call gets (``--num_seeds`` expanded per ticket)."""
    from experiments import run as run_cmd
    return [cfg for cell in program for cfg in run_cmd.seed_configs(cell.run_config())]


def train(configs: Sequence) -> None:
    """Train ``configs`` as one program (``driver.run``), after the run command's checks."""
    from rsst_jax import driver, parallel
    for cfg in configs:
        cli.check_paths(cfg)
    parallel.enable_compilation_cache()  # $RSST_JAX_CACHE; the cells share compiled programs
    driver.run(list(configs))


def _program_entry(args: Sequence[str]) -> int:
    """Subprocess entry: ``[--import M]... -- RUN_ARGS [-- RUN_ARGS ...]``: the cells'
    command lines, trained as one program; the exit code of experiments.run."""
    import importlib

    args = list(args)
    split = args.index("--")
    imports = [a for i, a in enumerate(args[:split]) if i > 0 and args[i - 1] == "--import"]
    argvs, current = [], None
    for tok in args[split:]:
        if tok == "--":
            current = []
            argvs.append(current)
        else:
            current.append(tok)
    from rsst_jax import parallel
    parallel.split_cpu()
    # A scheduler's SIGTERM (preemption, scancel) stops the program like Ctrl-C: exit 130
    # after its newest checkpoint, the run lock released.
    signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))
    for module in imports:
        importlib.import_module(module)
    from experiments import run as run_cmd

    resume = os.environ.get(RESUME_ENV) or (
        cli.resume_command("experiments.run", argvs[0]) if len(argvs) == 1 else None)
    return cli.run_command(
        lambda: train([c for argv in argvs for c in run_cmd.seed_configs(cli.parse_run_args(argv))]),
        resume=resume or "the sweep's command again")


def _announce(program: Sequence[Cell], log) -> None:
    verb = "resuming" if program[0].status == "partial" else "running"
    if len(program) == 1:
        log(f"[sweep] {verb} {program[0].name}")
    else:
        log(f"[sweep] {verb} {', '.join(c.name for c in program)} as one program "
            f"({len(program)} tickets)")


def _finish(program: Sequence[Cell], code: int, seconds: float, log, detail: str) -> None:
    """Each cell of a finished training call: finished when its run is complete (a
    ticket of a program can fail while the others finish), else failed."""
    for cell in program:
        complete = code == 0 or (cell.cfg.run.num_seeds == 1
                                 and summary_rows(cell.path) >= cell.cfg.prune.pruning_times)
        cell.returncode, cell.seconds = (0 if complete else code), round(seconds, 1)
        cell.status = "finished" if complete else "failed"
        if complete:
            log(f"[sweep] finished {cell.name} in {seconds:.0f} s")
            continue
        cell.note = detail
        output = paths_lib.RunPaths.of(cell.path).output
        where = f" (see {output})" if output.exists() else ""
        log(f"[sweep] FAILED {cell.name} with exit code {code}{where}"
            + (f": {detail}" if detail else ""))


def run_inprocess(programs: Sequence[Sequence[Cell]], log=print, record=lambda: None) -> None:
    """Train the programs one after another in this process."""
    for program in programs:
        _announce(program, log)
        start = time.time()
        try:
            code = cli.run_command(lambda program=program: train(program_configs(program)))
            detail = ""
        except Exception as e:  # noqa: BLE001  a crash in one program must not lose the others
            code, detail = 1, f"{e.__class__.__name__}: {cli.one_line(e)[:300]}"
        except SystemExit as e:
            code, detail = (e.code if isinstance(e.code, int) else 1), ""
        _finish(program, code, time.time() - start, log, detail)
        record()


def _last_line(path: pathlib.Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][-300:] if lines else ""


def _tee(stream, paths: Sequence[pathlib.Path]) -> None:
    """Copy a child's output, line by line, into the run.log of each of its cells."""
    files = [open(p, "ab") for p in paths]
    try:
        for line in iter(stream.readline, b""):
            for f in files:
                f.write(line)
                f.flush()
    finally:
        for f in files:
            f.close()
        stream.close()


def program_command(program: Sequence[Cell], imports: Sequence[str],
                    resume: bool = False) -> list[str]:
    """The child process that trains ``program`` (``_program_entry``); with ``resume``
    every cell gets --resume, so the same command also continues after an interruption
    (a requeued job, a retried task)."""
    code = ("import sys; from experiments.sweep import _program_entry; "
            "sys.exit(_program_entry(sys.argv[1:]))")
    extra = [x for m in imports for x in ("--import", m)]
    argvs = [cli.config_argv(c.cfg.replace(resume=True)) if resume else c.argv for c in program]
    return [sys.executable, "-c", code, *extra, *[x for argv in argvs for x in ("--", *argv)]]


def _pythonpath() -> str:
    root = str(pathlib.Path(__file__).resolve().parents[1])
    paths = [root, os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(paths))


# Variables a program on another machine gets from the sweep's environment (the rest is
# the node's own: PATH, CUDA_VISIBLE_DEVICES, ...).
FORWARDED = ("JAX_", "XLA_", "RSST_", "TF_CPP_")


def remote_env(resume: str) -> dict:
    """What a launcher adds to a node's environment for a program."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED)}
    env.update(PYTHONPATH=_pythonpath(), TQDM_DISABLE=os.environ.get("TQDM_DISABLE", "1"))
    env[RESUME_ENV] = resume
    return env


class Subprocesses:
    """Training calls in child processes, at most ``parallel`` at once."""

    def __init__(self, imports: Sequence[str], parallel: int, devices: Sequence[str],
                 resume: str, log=print):
        self.imports, self.parallel, self.devices = list(imports), parallel, list(devices)
        self.resume, self.log = resume, log
        self.active: dict = {}  # Popen -> (program, start, tee thread, slot)
        self.record = lambda: None  # writes OUT/sweep.json, after each program
        self.final = lambda: None   # the same after an interrupt, unfinished cells looked at again

    def command(self, program: Sequence[Cell]) -> list[str]:
        return program_command(program, self.imports)

    def env(self, device: Optional[str]) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = _pythonpath()
        env.setdefault("TQDM_DISABLE", "1")
        env[RESUME_ENV] = self.resume
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        return env

    def run(self, programs: Sequence[Sequence[Cell]]) -> None:
        queue = list(programs)
        free_slots = list(range(self.parallel))
        while queue or self.active:
            while queue and free_slots:
                program = queue.pop(0)
                slot = free_slots.pop(0)
                device = self.devices[slot % len(self.devices)] if self.devices else None
                logs = []
                for c in program:
                    c.path.mkdir(parents=True, exist_ok=True)
                    logs.append(paths_lib.RunPaths.of(c.path).output)
                _announce(program, lambda m, device=device: self.log(
                    m + (f" on device {device}" if device else "")))
                proc = subprocess.Popen(self.command(program), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, env=self.env(device))
                tee = threading.Thread(target=_tee, args=(proc.stdout, logs), daemon=True)
                tee.start()
                self.active[proc] = (program, time.time(), tee, slot)
            for proc in list(self.active):
                if proc.poll() is None:
                    continue
                program, start, tee, slot = self.active.pop(proc)
                tee.join()
                free_slots.append(slot)
                output = paths_lib.RunPaths.of(program[0].path).output
                _finish(program, proc.returncode, time.time() - start, self.log,
                        _last_line(output))
                self.record()
            if self.active:
                time.sleep(0.2)

    def stop(self, wait: float = 2.0) -> None:
        """Ctrl-C: interrupt the children (each keeps its last checkpoint), kill what is
        still running after ``wait`` seconds."""
        procs = list(self.active)
        for proc in procs:
            try:
                proc.send_signal(signal.SIGINT)
            except OSError:
                pass
        deadline = time.time() + wait
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
        for proc in procs:  # their last lines (the interrupted line) into the run.logs
            entry = self.active.get(proc)
            if entry is not None:
                entry[2].join(timeout=0.5)


# --------------------------------------------------------------------------- launchers

LAUNCHERS = ("local", "slurm", "ray")
# Flags of one launcher only: flag -> the launchers that take it.
LAUNCHER_FLAGS = {"partition": ("slurm",), "mem": ("slurm",), "time": ("slurm",),
                  "sbatch": ("slurm",), "detach": ("slurm",), "gpus": ("slurm", "ray"),
                  "cpus": ("slurm", "ray"), "ray_address": ("ray",)}
LOCAL_FLAGS = {"parallel": 1, "devices": "", "mode": "subprocess"}  # flag -> its default
JOBS = "slurm_jobs"  # OUT/slurm_jobs/<job id>/: each SLURM job's script and logs


def check_launcher_flags(args) -> None:
    """Each flag with the launcher that uses it (one line saying which, otherwise)."""
    for flag, takers in LAUNCHER_FLAGS.items():
        given = getattr(args, flag)
        if given not in (None, False) and args.launcher not in takers:
            raise SweepError(f"--{flag} is for --launcher {' or '.join(takers)}; drop it or "
                             f"add --launcher {takers[0]}")
    if args.launcher != "local":
        for flag, default in LOCAL_FLAGS.items():
            if getattr(args, flag) != default:
                raise SweepError(f"--{flag} is for --launcher local (a {args.launcher} "
                                 f"launcher runs every program at once where it has room)")
    if args.launcher == "ray" and not args.ray_address:
        raise SweepError("--launcher ray needs --ray_address HOST:PORT of a running cluster's "
                         "head (ray start --head prints it)")
    for flag in ("gpus", "cpus", "time"):
        value = getattr(args, flag)
        if value is not None and value < (1 if flag != "gpus" else 0):
            raise SweepError(f"--{flag} must be >= {1 if flag != 'gpus' else 0}, got {value}")


def make_launcher(args, out: pathlib.Path):
    from experiments import launchers
    try:
        if args.launcher == "slurm":
            return launchers.Slurm(out / JOBS, partition=args.partition, gpus=args.gpus or 0,
                                   cpus=args.cpus or 1, mem=args.mem,
                                   time_min=args.time or 240, sbatch=args.sbatch or "")
        return launchers.Ray(args.ray_address, gpus=args.gpus or 0, cpus=args.cpus or 1)
    except launchers.LauncherError as e:
        raise SweepError(str(e)) from None


def _read_record(out: pathlib.Path) -> dict:
    try:
        return json.loads((out / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def run_launched(launcher, programs: Sequence[Sequence[Cell]], cells: Sequence[Cell],
                 args, resume: str, record, previous: dict, log=print) -> bool:
    """Submit ``programs`` through ``launcher`` (the jobs of an earlier sweep command that
    are still queued or running are collected, not submitted again); then, unless
    --detach, wait for every job and finish its cells. True where jobs are still out.
    ``previous``: the sweep.json an earlier command left (its job ids)."""
    from experiments import launchers
    out = pathlib.Path(args.out)
    jobs: dict = {}  # job id -> (its cells, when the sweep saw it submitted)
    if previous.get("launcher") == launcher.name == "slurm":
        old = {c["name"]: c.get("job") for c in previous.get("cells", [])}
        for c in cells:  # a cell its job finished since: keep the job's id on record
            if c.status == "done":
                c.job = old.get(c.name)
        waiting = [c for c in cells if c.status in ("new", "partial") and old.get(c.name)]
        phases = launcher.phases([old[c.name] for c in waiting])
        for c in waiting:
            if phases[old[c.name]] != "ended":
                c.status, c.job, c.program = phases[old[c.name]], old[c.name], None
                jobs.setdefault(c.job, ([], time.time()))[0].append(c)
        programs = [[c for c in p if c.job is None] for p in programs]
        programs = [p for p in programs if p]
        for job, (members, _) in jobs.items():
            log(f"[sweep] {', '.join(c.name for c in members)}: job {job} is "
                f"{members[0].status}; collecting it")
        record()
    env = remote_env(resume)
    for program in programs:
        logs = []
        for c in program:
            c.path.mkdir(parents=True, exist_ok=True)
            logs.append(str(paths_lib.RunPaths.of(c.path).output.resolve()))
        job = launcher.submit(launchers.Program(
            name=program[0].name if len(program) == 1 else f"{program[0].name}+{len(program) - 1}",
            argv=program_command(program, args.imports, resume=True), env=env,
            cwd=os.getcwd(), logs=logs))
        for c in program:
            c.status, c.job = "queued", job
        jobs[job] = (list(program), time.time())
        names = ", ".join(c.name for c in program)
        log(f"[sweep] submitted {names} as {launcher.name} job {job}"
            + (f" (one program, {len(program)} tickets)" if len(program) > 1 else ""))
        record()
    if args.detach:
        if jobs:
            log(f"[sweep] {len(jobs)} jobs out; python -m experiments.sweep --status {out} "
                f"shows them, the same sweep command collects them")
        return bool(jobs)
    while jobs:
        phases = launcher.phases(list(jobs))
        changed = False
        for job, phase in phases.items():
            members, start = jobs[job]
            if phase != "ended":
                if members[0].status != phase:
                    for c in members:
                        c.status = phase
                    changed = True
                continue
            jobs.pop(job)
            code = launcher.exit_code(job)
            _finish(members, 1 if code is None else code, time.time() - start, log,
                    _last_line(paths_lib.RunPaths.of(members[0].path).output))
            changed = True
        if changed:
            record()
        if jobs:
            time.sleep(1.0)
    return False


def show_status(out: pathlib.Path) -> int:
    """--status OUT: each cell of the sweep recorded in OUT/sweep.json and where it is."""
    from experiments import launchers
    record = _read_record(out)
    if not record.get("cells"):
        raise SweepError(f"--status {out}: no {RECORD} there; give the --out of a sweep")
    cells = record["cells"]
    phases = {}
    if record.get("launcher") == "slurm":
        states = launchers.slurm_states([c.get("job") for c in cells])
        phases = {j: launchers.job_phase(st) for j, st in states.items()}
    width = max(len(c["name"]) for c in cells)
    counts: dict = {}
    for c in cells:
        path = pathlib.Path(c["path"])
        rounds = c.get("rounds")
        job = c.get("job")
        if (summary_rows(path) >= rounds) if rounds else c["status"] in ("done", "finished"):
            state = "done"
        elif job and phases.get(job) in ("queued", "running"):
            state = f"{phases[job]} (job {job})"
        elif c["status"] == "failed" or (job and record.get("launcher") == "slurm"):
            line = _last_line(paths_lib.RunPaths.of(path).output) or c.get("note") or ""
            state = "failed" + (f": {line}" if line else "")
        elif c["status"] in ("queued", "running"):  # a launcher whose jobs end with the sweep
            state = "interrupted"
        else:
            state = "not started" if c["status"] == "new" else "unfinished"
        kind = re.split(r"[:(]", state)[0].strip()
        counts[kind] = counts.get(kind, 0) + 1
        print(f"  {c['name'].ljust(width)}  {state}")
    print(f"[sweep] {len(cells)} cells in {out}: "
          + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return 0


# --------------------------------------------------------------------------- command


def build_parser(status: bool = False) -> argparse.ArgumentParser:
    p = cli.OneLineParser(
        prog="python -m experiments.sweep", formatter_class=cli.DocHelpFormatter,
        description=cli.help_text(__doc__.split("\n\n", 1)[1]),
        epilog="Exit codes: 0 every cell finished, 1 some cell failed, 2 bad input (one line "
               "on stderr), 130 interrupted (the same command resumes).")
    p.add_argument("--out", required=not status,
                   help="folder for the cells' run directories and the comparison")
    p.add_argument("--base", default="", help="experiments.run flags shared by every cell, in "
                   "quotes (default: none, experiments.run's defaults)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="one axis of the grid: a flag of experiments.run and its values (use | "
                        "between values that contain commas); repeat for more axes (default: none)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME='FLAGS'",
                   help="a named set of extra flags; cells = variants x grid; repeat for more "
                        "(default: none)")
    p.add_argument("--group", action=argparse.BooleanOptionalAction, default=True,
                   help="train cells that differ only in seed, lr, rates, criteria or the "
                        "lambda schedule as one program; --no-group: one per cell")
    p.add_argument("--mode", choices=("subprocess", "inprocess"), default="subprocess",
                   help="subprocess: one process per program; inprocess: all in this process")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="programs at once (subprocess mode)")
    p.add_argument("--devices", default="", metavar="IDS",
                   help="comma-separated CUDA device ids handed to the parallel programs in "
                        "turn (default: every program sees every device)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE before running (registers your networks or criteria); "
                        "repeat for more (default: none)")
    p.add_argument("--dry_run", action="store_true", help="print the cells and their status, run nothing")
    p.add_argument("--no_compare", action="store_true", help="do not run experiments.compare at the end")
    p.add_argument("--compare_args", default="", metavar="FLAGS",
                   help="extra flags for experiments.compare, e.g. \"--metric "
                        "test_acc_at_best_val\" (default: none)")
    p.add_argument("--status", metavar="OUT", default=None,
                   help="show each cell of the sweep in OUT and where it is (done, running or "
                        "queued with its job id, failed with its log's last line), run nothing "
                        "(default: off)")
    c = p.add_argument_group("where programs run")
    c.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: here (--mode, --parallel, --devices); slurm: one job per "
                        "program through submitit; ray: one task per program on --ray_address")
    c.add_argument("--detach", action="store_true",
                   help="slurm: submit the jobs and return; the same command later collects "
                        "them (default: wait for them)")
    c.add_argument("--partition", default=None, help="slurm: the partition (default: the "
                   "cluster's default partition)")
    c.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="slurm, ray: GPUs per program (default: 0)")
    c.add_argument("--cpus", type=int, default=None, metavar="N",
                   help="slurm, ray: CPU cores per program (default: 1)")
    c.add_argument("--mem", default=None, metavar="SIZE",
                   help="slurm: memory per job, e.g. 16G (default: the partition's)")
    c.add_argument("--time", type=int, default=None, metavar="MINUTES",
                   help="slurm: time limit per job in minutes; a job reaching it is requeued "
                        "and resumes (default: 240)")
    c.add_argument("--sbatch", default=None, metavar="OPTIONS",
                   help="slurm: any other sbatch options as --name=value, e.g. \"--account=abc "
                        "--qos=high\" (default: none)")
    c.add_argument("--ray_address", default=None, metavar="HOST:PORT",
                   help="ray: the head of a running cluster; it must answer within 30 s "
                        "(default: none)")
    return p


def _write_record(out: pathlib.Path, args, cells: Sequence[Cell]) -> None:
    record = {"base": args.base, "grid": args.grid, "variant": args.variant, "mode": args.mode,
              "grouped": args.group, "imports": args.imports, "launcher": args.launcher,
              "cells": [{"name": c.name, "values": c.values, "path": str(c.path), "status": c.status,
                         "program": c.program, "returncode": c.returncode, "seconds": c.seconds,
                         "note": c.note, "command": c.command, "job": c.job,
                         "rounds": c.cfg.prune.pruning_times}
                        for c in cells]}
    from rsst_jax.callbacks import atomic_write
    atomic_write(out / RECORD, json.dumps(record, indent=1))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    status = any(a == "--status" or a.startswith("--status=") for a in argv)
    args = build_parser(status=status).parse_args(argv)
    if args.status is not None:
        return cli.run_command(lambda: show_status(pathlib.Path(args.status)))
    from rsst_jax import parallel
    # $RSST_JAX_CPU_DEVICES before this process touches JAX (--mode inprocess; subprocess
    # cells inherit the variable).
    parallel.split_cpu()
    resume = cli.resume_command("experiments.sweep", argv, resume_flag=None)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    children = Subprocesses(args.imports, args.parallel, devices, resume)

    def stop() -> None:  # Ctrl-C or SIGTERM: the children first, then each cell's outcome
        children.stop()
        children.final()
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (kill, a scheduler) ends the sweep as Ctrl-C does.
        previous = signal.signal(signal.SIGTERM,
                                 lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))
    try:
        return cli.run_command(lambda: sweep(args, children), resume=resume, on_interrupt=stop)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def sweep(args, children: Subprocesses) -> int:
    """The command, parsed: plan, classify, train what is left, compare."""
    import importlib

    out = pathlib.Path(args.out)
    check_launcher_flags(args)
    if args.parallel < 1:
        raise SweepError(f"--parallel must be >= 1, got {args.parallel}")
    if args.mode == "inprocess" and args.parallel > 1:
        raise SweepError("--parallel needs --mode subprocess")
    try:
        base = shlex.split(args.base)
    except ValueError as e:
        raise SweepError(f"--base: cannot split the flags ({e})") from None
    for module in args.imports:  # registered names must exist before validation
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise SweepError(f"--import {module}: {e}") from None
    cells = plan(out, base, args.grid, args.variant)
    for cell in cells:
        classify(cell)
    programs = plan_programs(cells, grouped=args.group)
    width = max(len(c.name) for c in cells)
    shared = sum(len(p) > 1 for p in programs)
    print(f"[sweep] {len(cells)} cells in {out}" + (
        f"; {len(programs)} programs to train, {shared} of them shared by several cells"
        if shared else "") + ":")
    for c in cells:
        together = c.program is not None and len(programs[c.program]) > 1
        print(f"  {c.name.ljust(width)}  {c.status}" + (f": {c.note}" if c.note else "")
              + (f"  (program {c.program + 1})" if together else ""))
    stale = [c for c in cells if c.status == "stale"]
    if stale:
        raise SweepError(f"cell {stale[0].name} in {out} {stale[0].note}")
    if args.dry_run:  # the command of each cell the sweep would train now
        for program in programs:
            for c in program:
                print(c.command)
        return 0
    out.mkdir(parents=True, exist_ok=True)

    children.record = lambda: _write_record(out, args, cells)

    def final() -> None:  # interrupted: unfinished cells as their folders say now
        for c in cells:
            if c.status in ("new", "partial") and c.job is None:
                classify(c)
        _write_record(out, args, cells)
    children.final = final
    if args.launcher == "local":
        _write_record(out, args, cells)
        if args.mode == "inprocess":
            run_inprocess(programs, record=children.record)
        else:
            children.run(programs)
    else:
        launcher = make_launcher(args, out)
        previous = _read_record(out)
        _write_record(out, args, cells)
        if run_launched(launcher, programs, cells, args, children.resume, children.record,
                        previous):
            return 0  # --detach: the jobs run on
    _write_record(out, args, cells)
    failed = [c for c in cells if c.status == "failed"]
    finished = [c for c in cells if c.status in ("done", "finished")]
    print(f"[sweep] {len(finished)} of {len(cells)} cells finished"
          + (f", {len(failed)} failed: {', '.join(c.name for c in failed)}" if failed else ""))
    if finished and not args.no_compare:
        have_rows = [c for c in finished if paths_lib.RunPaths.of(c.path).summary_json.is_file()]
        code = compare_cmd.main([str(c.path) for c in have_rows]
                                + ["--names", ",".join(c.name.replace(",", " ") for c in have_rows),
                                   "--out", str(out / COMPARISON),
                                   "--plot", str(out / f"{COMPARISON}.png")]
                                + shlex.split(args.compare_args))
        if code != 0:
            return code
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
