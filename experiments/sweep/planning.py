"""What a sweep runs: its cells (the product of the --grid axes and the --variant flag
sets, each a validated configuration of experiments.run with its own run directory),
each cell's state as its folder shows it, and the programs (training calls) that train
the cells still to run. No process is started here."""
from __future__ import annotations

import dataclasses
import difflib
import enum
import itertools
import json
import pathlib
import re
import shlex
from typing import Any, Optional, Sequence

from experiments import cli
from rsst_jax import checkpoint as ckpt
from rsst_jax import config as config_lib
from rsst_jax import paths as paths_lib
from rsst_jax import runs as runs_lib

# Settings a sweep sets itself, per cell (--base may name a --config file).
RESERVED = ("save_dir", "resume", "checkpoint", "dry_run", "config")


class SweepError(cli.BadInput):
    """Bad sweep input; the message says what to change."""


class State(str, enum.Enum):
    """Where a cell stands, as OUT/sweep.json records it (the value is the word written)."""
    NEW = "new"            # nothing trained yet: it runs
    PARTIAL = "partial"    # checkpoints but unfinished: it resumes
    DONE = "done"          # all its rounds were there before this command: skipped
    STALE = "stale"        # its folder was run with other flags: refused
    QUEUED = "queued"      # a cluster launcher's job has it, waiting
    RUNNING = "running"    # a cluster launcher's job has it, training
    FINISHED = "finished"  # its program ended and the run is complete
    FAILED = "failed"      # its program ended and the run is not complete

    def __str__(self) -> str:
        return self.value


TODO = (State.NEW, State.PARTIAL)       # to train (a local program keeps them while it runs)
OUT = (State.QUEUED, State.RUNNING)     # a cluster job has them
ENDED = (State.FINISHED, State.FAILED)  # the outcome of a program of this command

# Every move a cell's state may make, and only these (``Cell.move``). A state is first
# set from the cell's folder (``classify``: new, partial, done or stale); an unfinished
# cell is looked at again after an interrupt; a job may be requeued (running -> queued).
TRANSITIONS = {
    State.NEW: {*TODO, State.DONE, State.STALE, *OUT, *ENDED},
    State.PARTIAL: {*TODO, State.DONE, *OUT, *ENDED},
    State.QUEUED: {*OUT, *ENDED},
    State.RUNNING: {*OUT, *ENDED},
    State.DONE: set(), State.STALE: set(), State.FINISHED: set(), State.FAILED: set(),
}


@dataclasses.dataclass
class Cell:
    name: str
    values: dict                    # flag -> value as given on the command line, in axis order
    cfg: Any                        # its validated rsst_jax.config.Config (save_dir = path)
    path: pathlib.Path
    status: State = State.NEW       # ``move`` changes it
    returncode: Optional[int] = None
    seconds: Optional[float] = None
    note: str = ""
    program: Optional[int] = None   # the training call it is part of (cells of one share it)
    resume_step: Optional[int] = None
    job: Optional[str] = None       # the SLURM job or Ray task that trains it (a launcher's)

    def move(self, to: State) -> None:
        """Set the state; a move TRANSITIONS does not list is a bug of the sweep."""
        to = State(to)
        if to != self.status and to not in TRANSITIONS[State(self.status)]:
            raise RuntimeError(f"cell {self.name}: {self.status} -> {to} is no move of a "
                               f"sweep cell")
        self.status = to

    def run_config(self):
        """The configuration the cell runs with now (``--resume`` when it is unfinished)."""
        return self.cfg.replace(resume=self.status == State.PARTIAL)

    @property
    def argv(self) -> list[str]:
        """The experiments.run command line of the cell as it runs now."""
        return cli.config_argv(self.run_config())

    @property
    def command(self) -> str:
        """The cell's command as a shell runs it (``paths.command``: this interpreter),
        with the ``--import`` its network, criterion or method needs."""
        return paths_lib.command("experiments.run", self.argv,
                                 imports=config_lib.plugin_modules(self.cfg))


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


def complete(cell: Cell) -> bool:
    """The cell's run has all its rounds."""
    return summary_rows(cell.path) >= cell.cfg.prune.pruning_times


def classify(cell: Cell) -> None:
    """The cell's state from its folder: new, partial (resume it), done (skip it) or
    stale (refuse)."""
    run = paths_lib.RunPaths.of(cell.path)
    if not cell.path.exists() or not any(cell.path.iterdir()):
        cell.move(State.NEW)
        return
    if run.config.is_file():
        try:
            saved = json.loads(run.config.read_text())
        except json.JSONDecodeError:
            saved = {}
        listed = config_lib.semantic_diffs(
            saved, dict(cell.cfg.to_dict(), seed=cell.cfg.run.resolved_seed), limit=4)
        if listed:
            cell.move(State.STALE)
            cell.note = ("was run with different flags: " + listed
                         + "; delete the folder or choose another --out")
            return
    cell.resume_step = ckpt.latest_step(run.checkpoints)
    if complete(cell):
        cell.move(State.DONE)
    elif cell.resume_step is not None:
        cell.move(State.PARTIAL)
    else:
        cell.move(State.NEW)


def plan_programs(cells: Sequence[Cell], grouped: bool = True) -> list[list[Cell]]:
    """The training calls of the cells still to run: with ``grouped``, cells that may
    train as one program (``config.program_key``: settings differing only in groupable
    ones, no --distill; the same state; for unfinished cells newest checkpoints at most
    one step apart) share one; cells with --num_seeds > 1 (one program of their own
    already) never share. Sets ``cell.program``."""
    todo = [c for c in cells if c.status in TODO]
    if not grouped:
        programs = [[c] for c in todo]
    else:
        by_key: dict = {}
        for c in todo:
            key = config_lib.program_key(c.cfg)
            alone = c.name if key is None or c.cfg.run.num_seeds > 1 else None
            by_key.setdefault((State(c.status), alone, key), []).append(c)
        programs = []
        for (status, _, _), members in by_key.items():
            if status != State.PARTIAL:
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


__all__ = ["Cell", "State", "TRANSITIONS", "SweepError", "RESERVED", "plan", "classify",
           "plan_programs", "parse_axis", "parse_variant", "cell_name",
           "summary_rows", "complete"]
