"""The numbers of ``experiments.compare``: each run's curve of accuracy against remaining
weights (or channel sparsity), the accuracy at matched levels, and the rows of the table,
one per run or per seed group (``SeedStat``s over its seeds).

Pure functions of ``rsst_jax.runs.Run``s; ``experiments.compare`` re-exports every name.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

from rsst_jax import runs as runs_lib

MAX_AUTO_LEVELS = 5
SeedStat = runs_lib.SeedStat
# A row of the table: one run, or the runs of a seed group (several seeds, one configuration).
Entry = Union[runs_lib.Run, Sequence[runs_lib.Run]]


def curve(run: runs_lib.Run, metric: str, x: str = "remaining_weight_pct") -> list[tuple[float, float, int]]:
    """(x, accuracy, round) per finished round with both values, in round order."""
    out = []
    for row in run.summary:
        xv, yv = runs_lib.summary_value(row, x), runs_lib.summary_value(row, metric)
        if xv is not None and yv is not None:
            out.append((xv, yv, int(row["round"])))
    return out


def matched_accuracy(points: Sequence[tuple[float, float, int]], level: float) -> Optional[float]:
    """Accuracy at ``level`` % remaining weights, linear in log(remaining) between the two
    rounds that bracket it; None outside the run's range. A match within 0.01% (relative
    relative) returns that round's value (the last such round)."""
    if level <= 0 or not points:
        return None
    for xv, yv, _ in reversed(points):
        if abs(xv - level) <= 1e-4 * level:
            return yv
    ordered = sorted(((xv, yv) for xv, yv, _ in points if xv > 0), reverse=True)
    for (x0, y0), (x1, y1) in zip(ordered, ordered[1:]):
        if x0 > level > x1:
            t = (math.log(x0) - math.log(level)) / (math.log(x0) - math.log(x1))
            return y0 + t * (y1 - y0)
    return None


def matched_channel_accuracy(points: Sequence[tuple[float, float, int]], level: float
                             ) -> Optional[float]:
    """Accuracy at ``level`` % channel sparsity (``points``: channel sparsity, accuracy,
    round), linear between the two rounds that bracket it; None outside the run's range
    (a run that removes no channel has none). A round within 0.01 points returns its value
    (the last such round)."""
    for xv, yv, _ in reversed(points):
        if abs(xv - level) <= 0.01:
            return yv
    ordered = sorted((xv, yv) for xv, yv, _ in points)
    for (x0, y0), (x1, y1) in zip(ordered, ordered[1:]):
        if x0 < level < x1:
            return y0 + (level - x0) / (x1 - x0) * (y1 - y0)
    return None


def default_channel_levels(runs: Sequence[runs_lib.Run]) -> list[float]:
    """Nominal channel sparsities ``100 (1 - (1 - rate)^k)`` (k = 1..R-1) of the first run
    with a rate (what a method removing ``rate`` of the live channels per round reaches),
    thinned as ``default_levels``."""
    return [round(100.0 - level, 2) for level in default_levels(runs)]


def channel_column(level: float) -> str:
    return f"acc@ch{level:g}%"


def default_levels(runs: Sequence[runs_lib.Run]) -> list[float]:
    """Nominal remaining-weight levels ``100 (1 - rate)^k`` (k = 1..R-1) of the first run
    with a rate, thinned to at most five evenly spaced ones (the sparsest always kept)."""
    for run in runs:
        rate, rounds = run.config.get("rate"), run.rounds_planned
        if rate is None or not rounds or rounds < 2:
            continue
        levels = [round(100.0 * (1.0 - float(rate)) ** k, 2) for k in range(1, rounds)]
        if len(levels) > MAX_AUTO_LEVELS:
            idx = {round(i * (len(levels) - 1) / (MAX_AUTO_LEVELS - 1)) for i in range(MAX_AUTO_LEVELS)}
            levels = [levels[i] for i in sorted(idx)]
        return levels
    return []


def level_column(level: float) -> str:
    return f"acc@{level:g}%"


def members(entry: Entry) -> list[runs_lib.Run]:
    """The runs of a table entry (one run, or a seed group)."""
    return [entry] if isinstance(entry, runs_lib.Run) else list(entry)


def seed_curve(group: Sequence[runs_lib.Run], metric: str, x: str = "remaining_weight_pct"
               ) -> list[tuple[SeedStat, SeedStat, int]]:
    """``curve`` over the seeds of a group: per round, (x, accuracy, round) as mean and
    standard deviation over the seeds that have both values in that round."""
    per_seed = [{rnd: (xv, yv) for xv, yv, rnd in curve(run, metric, x)} for run in group]
    out = []
    for rnd in sorted({r for points in per_seed for r in points}):
        pts = [points[rnd] for points in per_seed if rnd in points]
        out.append((runs_lib.seed_stat([p[0] for p in pts], of=len(group)),
                    runs_lib.seed_stat([p[1] for p in pts], of=len(group)), rnd))
    return out


def seed_group_row(group: Sequence[runs_lib.Run], name: str, metric: str,
                   levels: Sequence[float], channel_levels: Sequence[float] = ()) -> dict:
    """The table row of a seed group: each number a ``SeedStat`` over its seeds (the last
    round's sparsities over the seeds that finished it; the best round by mean accuracy;
    accuracy at a level matched per seed, then averaged)."""
    first, of = group[0], len(group)
    last = {key: runs_lib.round_stats(group, key) for key in ("remaining_weight_pct",
                                                              "channel_sparsity_pct")}
    points = seed_curve(group, metric)
    best = max(points, key=lambda p: (p[1].mean, -p[2])) if points else None
    done = sorted({run.rounds_done for run in group})
    done_text = str(done[0]) if len(done) == 1 else f"{done[0]}-{done[-1]}"
    planned = first.rounds_planned
    row = {
        "run": f"{name} ({runs_lib.seeds_label(group)})",
        "method": first.method,
        "criteria": first.criteria,
        "schedule": first.schedule,
        "rounds": f"{done_text}/{planned}" if planned else done_text,
        "remaining_weight_pct": last["remaining_weight_pct"][max(last["remaining_weight_pct"])]
        if last["remaining_weight_pct"] else None,
        "channel_sparsity_pct": last["channel_sparsity_pct"][max(last["channel_sparsity_pct"])]
        if last["channel_sparsity_pct"] else None,
        "best_acc": best[1] if best else None,
        "best_round": best[2] if best else None,
    }
    for level in levels:
        row[level_column(level)] = runs_lib.seed_stat(
            [matched_accuracy(curve(run, metric), level) for run in group], of=of)
    for level in channel_levels:
        row[channel_column(level)] = runs_lib.seed_stat(
            [matched_channel_accuracy(curve(run, metric, "channel_sparsity_pct"), level)
             for run in group], of=of)
    row["path"] = ";".join(str(run.path) for run in group)
    row["seeds"] = of
    return row


def partial_note(name: str, group: Sequence[runs_lib.Run]) -> Optional[str]:
    """One line saying which rounds of a seed group not every seed has finished."""
    partial = runs_lib.partial_rounds(group)
    if len(group) < 2 or not partial:
        return None
    rounds = ", ".join(f"round {r} by {n}" for r, n in partial.items())
    return (f"note: {name} ({runs_lib.seeds_label(group)}): not every seed has finished ({rounds} of "
            f"{len(group)} seeds); a round's numbers are over the seeds that finished it")


def comparison_rows(runs: Sequence[Entry], names: Sequence[str], metric: str,
                    levels: Sequence[float], channel_levels: Sequence[float] = ()) -> list[dict]:
    """One dict per run, or per seed group (a sequence of runs; its numbers are
    ``SeedStat``s), with the table's values (numbers unrounded, None where unknown)."""
    rows = []
    for entry, name in zip(runs, names):
        group = members(entry)
        if len(group) > 1:
            rows.append(seed_group_row(group, name, metric, levels, channel_levels))
            continue
        run = group[0]
        last = run.summary[-1] if run.summary else {}
        points = curve(run, metric)
        best = max(points, key=lambda p: (p[1], -p[2])) if points else None
        planned = run.rounds_planned
        row = {
            "run": name,
            "method": run.method,
            "criteria": run.criteria,
            "schedule": run.schedule,
            "rounds": f"{run.rounds_done}/{planned}" if planned else str(run.rounds_done),
            "remaining_weight_pct": runs_lib.summary_value(last, "remaining_weight_pct"),
            "channel_sparsity_pct": runs_lib.summary_value(last, "channel_sparsity_pct"),
            "best_acc": best[1] if best else None,
            "best_round": best[2] if best else None,
        }
        for level in levels:
            row[level_column(level)] = matched_accuracy(points, level)
        for level in channel_levels:
            row[channel_column(level)] = matched_channel_accuracy(
                curve(run, metric, "channel_sparsity_pct"), level)
        row["path"] = str(run.path)
        row["seeds"] = 1
        rows.append(row)
    return rows


def unique_names(runs: Sequence[runs_lib.Run]) -> list[str]:
    """Directory names, prefixed by their parent where two runs share a name."""
    names = [r.name for r in runs]
    out = []
    for run, name in zip(runs, names):
        if names.count(name) > 1:
            name = f"{run.path.parent.name}/{name}"
        out.append(name)
    return out


def table_entries(runs: Sequence[runs_lib.Run], names: Sequence[str], *, group: bool = True,
                  note=None) -> tuple[list[list[runs_lib.Run]], list[str]]:
    """The table's entries (seed groups with ``group``, else one per run) and their names
    (a group's from ``seed_group_name``), in the order of the runs."""
    name_of = {id(run): name for run, name in zip(runs, names)}
    entries = runs_lib.group_seeds(runs, note=note) if group else [[run] for run in runs]
    return entries, [name_of[id(e[0])] if len(e) == 1 else
                     runs_lib.seed_group_name(e, [name_of[id(r)] for r in e]) for e in entries]

