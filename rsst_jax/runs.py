"""Read what ``python -m experiments.run`` writes: run directories, summaries and logs.

A run directory (``--save_dir``, layout in ``rsst_jax.paths``) holds ``config.json``,
``log.jsonl`` (one JSON object per epoch), ``summary.json`` (one row per round) and orbax
checkpoints; ``load_run`` checks that a directory is one and returns its contents
(checkpoints are opened with ``rsst_jax.tickets``). Seed grouping, for compare and plot:
``group_seeds`` finds the runs that differ only in seed, ``seed_group_name`` names such a
group, ``round_stats`` and ``SeedStat`` hold one value over its seeds and
``partial_rounds`` says which rounds not every seed has finished. No JAX here. Errors are
``RunDirError`` with a one-line message saying what was expected.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

from rsst_jax import config as config_lib
from rsst_jax import metrics as metrics_lib
from rsst_jax import paths as paths_lib
from rsst_jax import tickets
from rsst_jax.methods import registry as methods
# Defined beside the layout (rsst_jax.tickets needs them too; no import cycle); read here.
from rsst_jax.paths import RunDirError, is_run_dir

# Columns every summary row of this layout has; a row without them is another layout.
_REQUIRED_SUMMARY = ("round", "remaining_weight_pct", "channel_sparsity_pct", "final_test_acc")


# --------------------------------------------------------------------------- runs


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON (line {e.lineno}): the file is damaged") from None
    except OSError as e:
        raise RunDirError(f"cannot read {path}: {e.strerror}") from None


def read_log(path: str | pathlib.Path) -> list[dict]:
    """Rows of ``log.jsonl``; a torn last line (run killed mid-write) is dropped.
    Epochs count from 1 (a log written by rsst-jax 0.1, which counted from 0, is shifted)."""
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise RunDirError(f"{path} line {i + 1} is not valid JSON: the file is damaged") from None
        if not isinstance(row, dict) or "round" not in row or "epoch" not in row:
            raise RunDirError(f"{path} line {i + 1} has no round/epoch: not an rsst-jax epoch log")
        rows.append(row)
    if rows and min(r["epoch"] for r in rows) == 0:
        rows = [dict(r, epoch=r["epoch"] + 1) for r in rows]
    return rows


@dataclasses.dataclass
class Run:
    """One run directory: resolved flags, per-round summary rows and per-epoch log rows."""

    path: pathlib.Path
    config: dict
    summary: list[dict]
    log: list[dict]

    @property
    def name(self) -> str:
        return self.path.name

    # ---------------------------------------------------------------- description
    @property
    def struct(self) -> str:
        return str(self.config.get("struct", "?"))

    @property
    def method(self) -> str:
        """The method's name for this run (``Method.label``: IMP, Refill, Refill+, RSST,
        or the baseline prune method), plus a non-default scope; the --struct value for a
        method whose module is not imported."""
        c = self.config
        found = methods.find_method(c.get("struct"))
        name = found.label(c) if found is not None else self.struct
        if c.get("prune_scope") == "layerwise" or c.get("layer_rates"):
            name += " (layerwise)"
        return name

    def _described(self, key: str) -> str:
        found = methods.find_method(self.config.get("struct"))
        return found.describe(self.config)[key] if found is not None else "?"

    @property
    def criteria(self) -> str:
        return self._described("criteria")

    @property
    def schedule(self) -> str:
        return self._described("schedule")

    @property
    def rounds_planned(self) -> Optional[int]:
        value = self.config.get("pruning_times")
        return int(value) if value is not None else None

    @property
    def rounds_done(self) -> int:
        return len(self.summary)

    @property
    def complete(self) -> bool:
        return self.rounds_planned is not None and self.rounds_done >= self.rounds_planned

    def epochs(self, round_idx: int) -> list[dict]:
        """Log rows of one round, in epoch order."""
        return sorted((r for r in self.log if r.get("round") == round_idx), key=lambda r: r["epoch"])

    # ---------------------------------------------------------------- checkpoints
    def checkpoints(self) -> list:
        """Every round checkpoint (``tickets.CheckpointRef``, final and best), by round."""
        return tickets.list_checkpoints(self.path)


def _existing_dir(path, expected: str) -> pathlib.Path:
    """``path`` as a Path; RunDirError when it is missing or a file."""
    p = pathlib.Path(path)
    if not p.exists():
        raise RunDirError(f"{p}: no such directory")
    if not p.is_dir():
        raise RunDirError(f"{p} is a file; expected {expected}")
    return p


def load_run(path: str | pathlib.Path, *, need_summary: bool = True) -> Run:
    """Read a run directory; ``need_summary`` requires at least one finished round.

    Raises ``RunDirError`` when ``path`` is not a run directory, a file is damaged or
    the summary is from another layout.
    """
    p = _existing_dir(path, "a run directory (the --save_dir of python -m experiments.run)")
    run = paths_lib.RunPaths.of(p)
    names = f"{paths_lib.SUMMARY_JSON}, {paths_lib.LOG} or {paths_lib.CONFIG}"
    if not is_run_dir(p):
        raise RunDirError(f"{p} is not an rsst-jax run directory: it has no {names} (expected "
                          f"the --save_dir of python -m experiments.run)")
    config = _read_json(run.config) if run.config.is_file() else {}
    if not isinstance(config, dict):
        raise RunDirError(f"{run.config} is not a mapping of flags: not an rsst-jax config")
    summary = _read_json(run.summary_json) if run.summary_json.is_file() else []
    if not isinstance(summary, list) or not all(isinstance(r, dict) for r in summary):
        raise RunDirError(f"{run.summary_json} is not a list of round rows: written by another "
                          f"tool or an older layout")
    for row in summary:
        missing = [k for k in _REQUIRED_SUMMARY if k not in row]
        if missing:
            raise RunDirError(f"{run.summary_json} comes from an older layout: its rows lack "
                              f"{', '.join(missing)}; re-run with this version of rsst-jax")
    if need_summary and not summary:
        raise RunDirError(f"{p} has no finished round yet ({paths_lib.SUMMARY_JSON} is missing "
                          f"or empty); wait for round 0 to finish or resume it with --resume")
    summary = sorted((metrics_lib.renamed(r) for r in summary), key=lambda r: r["round"])
    return Run(path=p, config=config, summary=summary, log=read_log(run.log))


def find_runs(paths: list[str | pathlib.Path]) -> list[pathlib.Path]:
    """Run directories among ``paths``; a path that is not one contributes its run subfolders
    (so a sweep's output folder stands for all its cells). Order: as given, then sorted."""
    out = []
    for path in paths:
        p = pathlib.Path(path)
        if is_run_dir(p) or not p.is_dir():
            out.append(p)
            continue
        children = sorted(c for c in p.iterdir() if is_run_dir(c))
        out.extend(children or [p])  # load_run(p) then explains what is wrong
    return out


def summary_value(row: dict, key: str) -> Optional[float]:
    """A numeric summary value, or None when absent or not finite."""
    value = row.get(key)
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------- seeds

def seed_of(run: Run) -> int:
    """The run's seed (``--seed`` None means 0)."""
    seed = run.config.get("seed")
    return 0 if seed is None else int(seed)


def seed_key(config: dict) -> Optional[str]:
    """What a run computes apart from its seed: its configuration without the seed-like
    and the non-semantic flags (``config.Flag``; absent flags at their default), as
    canonical JSON. None for a run without a configuration, which groups with nothing."""
    if not config:
        return None
    ignore = set(config_lib.names_where(seed_like=True)) | set(
        config_lib.names_where(semantic=False))
    values = {name: config_lib.field_of(name).default for name in config_lib.flag_names()}
    values.update(config)
    return json.dumps({k: v for k, v in values.items() if k not in ignore}, sort_keys=True,
                      default=str)


def group_seeds(runs: Sequence[Run], note: Optional[Callable[[str], None]] = None
                ) -> list[list[Run]]:
    """``runs`` partitioned into groups of runs that differ only in seed (equal
    ``seed_key``), each sorted by seed, the groups in the order of their first run. A
    group of one is an ordinary run. Runs of one configuration where two share a seed are
    replicas, not seeds: they stay apart (``note`` says so)."""
    by_key: dict[Any, list[Run]] = {}
    for i, run in enumerate(runs):
        key = seed_key(run.config)
        by_key.setdefault(("alone", i) if key is None else key, []).append(run)
    groups: list[list[Run]] = []
    for members in by_key.values():
        seeds = [seed_of(r) for r in members]
        if len(set(seeds)) == len(seeds):
            groups.append(sorted(members, key=seed_of))
            continue
        if note is not None:
            note(f"note: {', '.join(str(r.path) for r in members)} share a configuration but "
                 f"not distinct seeds ({', '.join(map(str, seeds))}); each stays its own run")
        groups.extend([r] for r in members)
    return groups


# A seed in a name: a sweep cell's ``seed=3`` or a --num_seeds folder's ``seed_3``.
_SEED_PART = re.compile(r"(?:^|(?<=[ ,/]))seed[=_]-?\d+(?=$|[ ,/])")


def strip_seed(name: str) -> str:
    """``name`` without its seed part: 'struct=rsst seed=2' -> 'struct=rsst', 'seed_2' -> ''."""
    text = _SEED_PART.sub("", name)
    return re.sub(r"[ ,/]{2,}", lambda m: m.group(0)[0], text).strip(" ,/")


def seed_group_name(group: Sequence[Run], names: Sequence[str]) -> str:
    """The name of a seed group from its runs' names: their common name without the seed
    ('struct=rsst seed=0', 'struct=rsst seed=1' -> 'struct=rsst'); for --num_seeds
    folders (seed_0, seed_1, ...) the folder holding them; else the names joined by '+'."""
    stripped = list(dict.fromkeys(strip_seed(n) for n in names))
    if len(stripped) == 1 and stripped[0]:
        return stripped[0]
    parents = {run.path.parent for run in group}
    if stripped == [""] and len(parents) == 1:
        return next(iter(parents)).name or str(next(iter(parents)))
    return "+".join(n for n in stripped if n) or "+".join(names)


def seeds_label(group: Sequence[Run]) -> str:
    """How a seed group is counted in a title or a table: '3 seeds'."""
    return f"{len(group)} seeds"


def partial_rounds(group: Sequence[Run]) -> dict[int, int]:
    """Round -> number of seeds that finished it, for the rounds some seed has not."""
    counts: dict[int, int] = {}
    for run in group:
        for row in run.summary:
            counts[int(row["round"])] = counts.get(int(row["round"]), 0) + 1
    return {r: n for r, n in sorted(counts.items()) if n < len(group)}


class SeedStat(NamedTuple):
    """One number over the seeds of a group: the mean, the sample standard deviation
    (n - 1 in the denominator; None for a single value), the number of seeds it is
    over (``n``) and the group's size (``of``; n < of where some seed lacks the value,
    e.g. has not finished that round)."""

    mean: float
    std: Optional[float]
    n: int
    of: int


def seed_stat(values: Sequence[Optional[float]], of: Optional[int] = None) -> Optional[SeedStat]:
    """Mean and sample standard deviation of the values that are not None (float64, as
    numpy computes them); None when there is none. ``of``: the group's size (default:
    the number of values given)."""
    known = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if known.size == 0:
        return None
    std = float(np.std(known, ddof=1)) if known.size > 1 else None
    return SeedStat(float(np.mean(known)), std, int(known.size), len(values) if of is None else of)


def round_stats(group: Sequence[Run], key: str) -> dict[int, SeedStat]:
    """Round -> ``key`` of that round's summary rows over the seeds of ``group`` that
    finished the round with a finite value (``summary_value``), in round order."""
    rows = [{int(r["round"]): summary_value(r, key) for r in run.summary} for run in group]
    out = {}
    for rnd in sorted({r for by_round in rows for r in by_round}):
        value = seed_stat([by_round[rnd] for by_round in rows if by_round.get(rnd) is not None],
                          of=len(group))
        if value is not None:
            out[rnd] = value
    return out
