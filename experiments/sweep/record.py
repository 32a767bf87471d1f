"""The sweep's own files in OUT: ``sweep.json`` (the plan, each cell's command, state,
job and outcome), ``slurm_jobs/`` (submitit's folder of each SLURM job) and the
comparison; and ``--status OUT``, which reads them back."""
from __future__ import annotations

import json
import pathlib
import re
from typing import Sequence

from experiments import launchers
from experiments.sweep.planning import Cell, State, SweepError, summary_rows
from rsst_jax import paths as paths_lib

RECORD = "sweep.json"
COMPARISON = "comparison"
JOBS = "slurm_jobs"  # OUT/slurm_jobs/<job id>/: each SLURM job's script and logs (submitit's)


def write(out: pathlib.Path, args, cells: Sequence[Cell]) -> None:
    """OUT/sweep.json as the cells stand now (replaced whole)."""
    record = {"base": args.base, "grid": args.grid, "variant": args.variant, "mode": args.mode,
              "grouped": args.group, "imports": args.imports, "launcher": args.launcher,
              "cells": [{"name": c.name, "values": c.values, "path": str(c.path),
                         "status": str(c.status), "program": c.program,
                         "returncode": c.returncode, "seconds": c.seconds, "note": c.note,
                         "command": c.command, "job": c.job,
                         "rounds": c.cfg.prune.pruning_times}
                        for c in cells]}
    paths_lib.atomic_write(pathlib.Path(out) / RECORD, json.dumps(record, indent=1))


def read(out: pathlib.Path) -> dict:
    """OUT/sweep.json ({} where there is none or it cannot be read)."""
    try:
        return json.loads((pathlib.Path(out) / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def last_line(path: pathlib.Path) -> str:
    """The last line of a log that is not blank (at most 300 characters; '' if none)."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][-300:] if lines else ""


def show_status(out: pathlib.Path) -> int:
    """--status OUT: each cell of the sweep recorded in OUT/sweep.json and where it is."""
    record = read(out)
    if not record.get("cells"):
        raise SweepError(f"--status {out}: no {RECORD} there; give the --out of a sweep")
    cells = record["cells"]
    slurm = record.get("launcher") == "slurm"
    phases = launchers.slurm_phases(pathlib.Path(out) / JOBS,
                                    [c["job"] for c in cells if c.get("job")]) if slurm else {}
    width = max(len(c["name"]) for c in cells)
    counts: dict = {}
    for c in cells:
        path = pathlib.Path(c["path"])
        rounds = c.get("rounds")
        job = c.get("job")
        if (summary_rows(path) >= rounds) if rounds else c["status"] in (State.DONE, State.FINISHED):
            state = "done"
        elif job and phases.get(job) in ("queued", "running"):
            state = f"{phases[job]} (job {job})"
        elif c["status"] == State.FAILED or (job and slurm):
            line = last_line(paths_lib.RunPaths.of(path).output) or c.get("note") or ""
            state = "failed" + (f": {line}" if line else "")
        elif c["status"] in (State.QUEUED, State.RUNNING):  # a launcher whose jobs end with the sweep
            state = "interrupted"
        else:
            state = "not started" if c["status"] == State.NEW else "unfinished"
        kind = re.split(r"[:(]", state)[0].strip()
        counts[kind] = counts.get(kind, 0) + 1
        print(f"  {c['name'].ljust(width)}  {state}")
    print(f"[sweep] {len(cells)} cells in {out}: "
          + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return 0


__all__ = ["RECORD", "COMPARISON", "JOBS", "write", "read", "last_line", "show_status"]
