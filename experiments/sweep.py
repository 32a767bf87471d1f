r"""Run a grid of runs, then compare them: python -m experiments.sweep.

Example (IMP vs Refill vs RSST, two seeds each, 3 x 2 = 6 cells):

    python -m experiments.sweep --out results/methods \
        --base "--dataset digits --arch res20s --epochs 2 --warmup 0 --pruning_times 3" \
        --grid struct=none,refill,rsst --grid seed=0,1

Cells are the product of the --grid KEY=V1,V2 axes (times the named --variant flag
sets, if any). Each cell is one "python -m experiments.run" with the --base flags, then
the cell's flags (which win), and --save_dir OUT/<cell name>; the name is made of the
cell's values, e.g. OUT/struct=rsst,criteria=l1. A cell whose summary already has all
its rounds is skipped; one with checkpoints but unfinished is resumed; one whose saved
flags differ from what the sweep would run now is refused (delete it or choose another
--out). Finally experiments.compare writes OUT/comparison.csv, .md and .png over all
finished cells; OUT/sweep.json records the plan, each cell's command and outcome.

Cells run one after another in subprocesses (default; a crash stays in its cell, the
output goes to OUT/<cell>/run.log), --parallel N at a time (--devices 0,1 gives each
its own GPU through CUDA_VISIBLE_DEVICES), or all in this process (--mode inprocess:
no start-up cost per cell). --import MODULE imports your module first, so a network or
criterion registered there is available to every cell.

Exit codes: 0 every cell finished, 1 some cell failed, 2 bad input.
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
import subprocess
import sys
import time
from typing import Optional, Sequence

from experiments import compare as compare_cmd
from experiments.compare import OneLineParser, fail
from rsst_jax import runs as runs_lib

# Flags a sweep sets itself or that make no sense per cell.
RESERVED = ("save_dir", "resume", "checkpoint", "dry_run", "config")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


class SweepError(ValueError):
    """Bad sweep input; the message says what to change."""


@dataclasses.dataclass
class Cell:
    name: str
    values: dict            # flag -> value text, in axis order
    argv: list              # experiments.run arguments (without --save_dir/--resume)
    path: pathlib.Path
    status: str = "new"     # new | partial | done | stale | running | finished | failed
    returncode: Optional[int] = None
    seconds: Optional[float] = None
    note: str = ""


# --------------------------------------------------------------------------- planning


def _run_parser():
    from experiments import cli

    return cli.run_parser()


def _actions(parser) -> dict:
    """flag name -> argparse action of experiments.run."""
    out = {}
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and not opt.startswith("--no-"):
                out[opt[2:]] = action
    return out


def _takes_value(action) -> bool:
    return action.nargs != 0


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


def _strip_flags(argv: list[str], keys: set[str], actions: dict) -> list[str]:
    """``argv`` without any occurrence of the flags in ``keys`` (so a cell's value wins)."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        flag = tok[2:].split("=", 1)[0] if tok.startswith("--") else None
        if flag is not None and flag.startswith("no-") and flag[3:] in keys:
            continue
        if flag in keys:
            skip = "=" not in tok and _takes_value(actions[flag])
            continue
        out.append(tok)
    return out


def _cell_flags(values: dict, actions: dict) -> list[str]:
    argv = []
    for key, value in values.items():
        action = actions[key]
        if _takes_value(action):
            argv += [f"--{key}", value]
            continue
        v = value.lower()
        if v not in _TRUE + _FALSE:
            raise SweepError(f"--grid {key}: --{key} is a switch; use {key}=true,false")
        if v in _TRUE:
            argv.append(f"--{key}")
        elif f"--no-{key}" in action.option_strings:
            argv.append(f"--no-{key}")
    return argv


def plan(out: pathlib.Path, base: Sequence[str], grids: Sequence[str],
         variants: Sequence[str]) -> list[Cell]:
    """The cells of the sweep, each with its full experiments.run argv; validates everything."""
    if not grids and not variants:
        raise SweepError("empty sweep: give at least one --grid KEY=V1,V2 or --variant NAME='FLAGS'")
    actions = _actions(_run_parser())
    known = sorted(actions)
    axes = [parse_axis(g, known) for g in grids]
    keys = [k for k, _ in axes]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise SweepError(f"--grid {dup[0]} is given twice; list all its values in one --grid")
    named = [parse_variant(v) for v in variants]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise SweepError("two --variant have the same NAME")
    for tok in base:
        flag = tok[2:].split("=", 1)[0] if tok.startswith("--") else None
        if flag in RESERVED and flag != "config":
            raise SweepError(f"--base must not set --{flag}: the sweep chooses it per cell")
    cells = []
    for variant in (named or [(None, [])]):
        for combo in itertools.product(*[vals for _, vals in axes]):
            values = dict(zip(keys, combo))
            vname, vargs = variant
            argv = _strip_flags(list(base), set(values), actions) + list(vargs) + _cell_flags(values, actions)
            name = cell_name(values, vname)
            cells.append(Cell(name=name, values=values, argv=argv, path=out / name))
    seen = {}
    for c in cells:
        if c.name in seen:
            raise SweepError(f"cells {seen[c.name]!r} and {c.name!r} get the same folder name")
        seen[c.name] = c.name
    return cells


def resolve(cell: Cell):
    """The cell's Config (validated), as experiments.run would resolve it."""
    import contextlib
    import io

    from experiments import cli
    from rsst_jax import config as config_lib

    argv = cell.argv + ["--save_dir", str(cell.path)]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return cli.parse_run_args(argv)
    except SystemExit:  # argparse printed "usage ... error: ..."
        lines = [l for l in err.getvalue().splitlines() if l.strip()]
        text = lines[-1].split(": error: ", 1)[-1] if lines else "bad flags"
        raise SweepError(f"cell {cell.name}: {text}") from None
    except config_lib.ConfigError as e:
        raise SweepError(f"cell {cell.name}: {' '.join(str(e).split())}") from None


def classify(cell: Cell, cfg) -> None:
    """Set ``cell.status``: new, partial (resume it), done (skip it) or stale (refuse)."""
    from rsst_jax import config as config_lib

    if not cell.path.exists() or not any(cell.path.iterdir()):
        cell.status = "new"
        return
    saved_path = cell.path / runs_lib.CONFIG_FILE
    if saved_path.is_file():
        try:
            saved = json.loads(saved_path.read_text())
        except json.JSONDecodeError:
            saved = {}
        listed = config_lib.semantic_diffs(saved, dict(cfg.to_dict(), seed=cfg.run.resolved_seed),
                                           limit=4)
        if listed:
            cell.status = "stale"
            cell.note = ("was run with different flags: " + listed
                         + "; delete the folder or choose another --out")
            return
    try:
        run = runs_lib.load_run(cell.path, need_summary=False)
        rows = len(run.summary)
    except runs_lib.RunDirError:
        rows = 0
    if rows >= cfg.prune.pruning_times:
        cell.status = "done"
    elif (cell.path / "checkpoints").is_dir() and any((cell.path / "checkpoints").iterdir()):
        cell.status = "partial"
    else:
        cell.status = "new"


# --------------------------------------------------------------------------- running


def _cell_entry(args: Sequence[str]) -> int:
    """Subprocess entry: ``[--import M]... -- RUN_ARGS`` -> experiments.run.main(RUN_ARGS)."""
    import importlib

    args = list(args)
    split = args.index("--")
    imports = [a for i, a in enumerate(args[:split]) if i > 0 and args[i - 1] == "--import"]
    for module in imports:
        importlib.import_module(module)
    from experiments import run as run_cmd

    return run_cmd.main(args[split + 1:])


def _cell_argv(cell: Cell) -> list[str]:
    return cell.argv + ["--save_dir", str(cell.path)] + (["--resume"] if cell.status == "partial" else [])


def _subprocess_cmd(cell: Cell, imports: Sequence[str]) -> list[str]:
    code = "import sys; from experiments.sweep import _cell_entry; sys.exit(_cell_entry(sys.argv[1:]))"
    extra = [x for m in imports for x in ("--import", m)]
    return [sys.executable, "-c", code, *extra, "--", *_cell_argv(cell)]


def _env(device: Optional[str]) -> dict:
    env = dict(os.environ)
    root = str(pathlib.Path(__file__).resolve().parents[1])
    paths = [root, os.getcwd()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("TQDM_DISABLE", "1")
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    return env


def _last_line(path: pathlib.Path) -> str:
    try:
        lines = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    return lines[-1][-300:] if lines else ""


def run_subprocesses(cells: list[Cell], imports: Sequence[str], parallel: int,
                     devices: Sequence[str], log=print) -> None:
    """Run ``cells`` in subprocesses, at most ``parallel`` at once; output to ``cell/run.log``."""
    queue = list(cells)
    active = {}  # Popen -> (cell, start, log file, slot)
    free_slots = list(range(parallel))
    while queue or active:
        while queue and free_slots:
            cell = queue.pop(0)
            slot = free_slots.pop(0)
            device = devices[slot % len(devices)] if devices else None
            cell.path.mkdir(parents=True, exist_ok=True)
            fh = open(cell.path / "run.log", "a")
            verb = "resuming" if cell.status == "partial" else "running"
            log(f"[sweep] {verb} {cell.name}" + (f" on device {device}" if device else ""))
            proc = subprocess.Popen(_subprocess_cmd(cell, imports), stdout=fh, stderr=subprocess.STDOUT,
                                    env=_env(device))
            active[proc] = (cell, time.time(), fh, slot)
        for proc in list(active):
            if proc.poll() is None:
                continue
            cell, start, fh, slot = active.pop(proc)
            fh.close()
            free_slots.append(slot)
            _finish(cell, proc.returncode, time.time() - start, log, _last_line(cell.path / "run.log"))
        if active:
            time.sleep(0.2)


def run_inprocess(cells: list[Cell], imports: Sequence[str], log=print) -> None:
    """Run ``cells`` one after another in this process."""
    import importlib

    for module in imports:
        importlib.import_module(module)
    from experiments import run as run_cmd

    for cell in cells:
        verb = "resuming" if cell.status == "partial" else "running"
        log(f"[sweep] {verb} {cell.name}")
        start = time.time()
        try:
            code = run_cmd.main(_cell_argv(cell))
            detail = ""
        except Exception as e:  # a crash in one cell must not lose the others
            code, detail = 1, f"{e.__class__.__name__}: {' '.join(str(e).split())[:300]}"
        except SystemExit as e:
            code, detail = (e.code if isinstance(e.code, int) else 1), ""
        _finish(cell, code, time.time() - start, log, detail)


def _finish(cell: Cell, code: int, seconds: float, log, detail: str) -> None:
    cell.returncode, cell.seconds = code, round(seconds, 1)
    cell.status = "finished" if code == 0 else "failed"
    if code == 0:
        log(f"[sweep] finished {cell.name} in {seconds:.0f} s")
    else:
        cell.note = detail
        where = f" (see {cell.path / 'run.log'})" if (cell.path / "run.log").exists() else ""
        log(f"[sweep] FAILED {cell.name} with exit code {code}{where}" + (f": {detail}" if detail else ""))


# --------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m experiments.sweep",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[1].rsplit("\n\nExit codes", 1)[0],
        epilog="Exit codes: 0 every cell finished, 1 some cell failed, 2 bad input.")
    p.add_argument("--out", required=True, help="folder for the cells' run directories and the comparison")
    p.add_argument("--base", default="", help="experiments.run flags shared by every cell, in quotes")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="one axis of the grid: a flag of experiments.run and its values (use | "
                        "between values that contain commas); repeat for more axes")
    p.add_argument("--variant", action="append", default=[], metavar="NAME='FLAGS'",
                   help="a named set of extra flags; cells = variants x grid; repeat for more")
    p.add_argument("--mode", choices=("subprocess", "inprocess"), default="subprocess",
                   help="subprocess: one process per cell; inprocess: all cells in this process")
    p.add_argument("--parallel", type=int, default=1, metavar="N", help="cells at once (subprocess mode)")
    p.add_argument("--devices", default="",
                   metavar="IDS", help="comma-separated CUDA device ids handed to the parallel cells in turn")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE before running (registers your networks or criteria)")
    p.add_argument("--dry_run", action="store_true", help="print the cells and their status, run nothing")
    p.add_argument("--no_compare", action="store_true", help="do not run experiments.compare at the end")
    p.add_argument("--compare_args", default="", metavar="FLAGS",
                   help="extra flags for experiments.compare, e.g. \"--metric test_acc_at_best_val\"")
    return p


def _write_record(out: pathlib.Path, args, cells: list[Cell]) -> None:
    record = {"base": args.base, "grid": args.grid, "variant": args.variant, "mode": args.mode,
              "imports": args.imports,
              "cells": [{"name": c.name, "values": c.values, "path": str(c.path), "status": c.status,
                         "returncode": c.returncode, "seconds": c.seconds, "note": c.note,
                         "command": "python -m experiments.run " + shlex.join(_cell_argv(c))}
                        for c in cells]}
    tmp = out / "sweep.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, out / "sweep.json")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from rsst_jax import parallel
    # $RSST_JAX_CPU_DEVICES before this process touches JAX (--mode inprocess; subprocess
    # cells inherit the variable). Every cell goes through experiments.run.main, which
    # also turns on the compilation cache, so the cells share their compiled programs.
    parallel.split_cpu()
    out = pathlib.Path(args.out)
    try:
        if args.parallel < 1:
            raise SweepError(f"--parallel must be >= 1, got {args.parallel}")
        if args.mode == "inprocess" and args.parallel > 1:
            raise SweepError("--parallel needs --mode subprocess")
        try:
            base = shlex.split(args.base)
        except ValueError as e:
            raise SweepError(f"--base: cannot split the flags ({e})") from None
        import importlib

        for module in args.imports:  # registered names must exist before validation
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise SweepError(f"--import {module}: {e}") from None
        cells = plan(out, base, args.grid, args.variant)
        for cell in cells:
            classify(cell, resolve(cell))
    except (SweepError, runs_lib.RunDirError) as e:
        return fail(str(e))
    width = max(len(c.name) for c in cells)
    print(f"[sweep] {len(cells)} cells in {out}:")
    for c in cells:
        print(f"  {c.name.ljust(width)}  {c.status}" + (f": {c.note}" if c.note else ""))
    stale = [c for c in cells if c.status == "stale"]
    if stale:
        return fail(f"cell {stale[0].name} in {out} {stale[0].note}")
    if args.dry_run:  # the commands the sweep would run now
        for c in cells:
            if c.status in ("new", "partial"):
                print("python -m experiments.run " + shlex.join(_cell_argv(c)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    todo = [c for c in cells if c.status in ("new", "partial")]
    _write_record(out, args, cells)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if args.mode == "inprocess":
        run_inprocess(todo, args.imports)
    else:
        run_subprocesses(todo, args.imports, args.parallel, devices)
    _write_record(out, args, cells)
    failed = [c for c in cells if c.status == "failed"]
    finished = [c for c in cells if c.status in ("done", "finished")]
    print(f"[sweep] {len(finished)} of {len(cells)} cells finished"
          + (f", {len(failed)} failed: {', '.join(c.name for c in failed)}" if failed else ""))
    if finished and not args.no_compare:
        have_rows = [c for c in finished if (c.path / runs_lib.SUMMARY_FILE).is_file()]
        code = compare_cmd.main([str(c.path) for c in have_rows]
                                + ["--names", ",".join(c.name.replace(",", " ") for c in have_rows),
                                   "--out", str(out / "comparison"),
                                   "--plot", str(out / "comparison.png")]
                                + shlex.split(args.compare_args))
        if code != 0:
            return code
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
