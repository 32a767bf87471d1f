"""Compare runs: ``python -m experiments.compare DIR [DIR ...]``.

One row per run: method, criterion, schedule, rounds, final remaining weights and
channel sparsity, the best accuracy and its round, and the accuracy at matched
remaining-weight levels (interpolated in log(remaining %) between the rounds that
bracket the level). The table is printed and written as CSV and Markdown;
``--plot`` draws accuracy against remaining weights (log x) and against channel
sparsity, one line per run; ``--bar`` draws the final numbers as grouped bars.

Reads only ``summary.json``/``config.json``; no JAX. Writes files only where ``--out``,
``--plot`` or ``--bar`` say.

Exit codes: 0 done, 2 bad input (one line on stderr).
"""
from __future__ import annotations

import argparse
import csv
import math
import pathlib
import sys
from typing import Optional, Sequence

from experiments import cli
from rsst_jax import runs as runs_lib

METRICS = ("final_test_acc", "test_acc_at_best_val", "best_val_acc", "final_val_acc")
METRIC_LABELS = {
    "final_test_acc": "final test accuracy (RSST: after removing channels)",
    "test_acc_at_best_val": "test accuracy at the best validation epoch",
    "best_val_acc": "best validation accuracy",
    "final_val_acc": "final validation accuracy",
}
SHORT_LABELS = {"final_test_acc": "final test accuracy (%)",
                "test_acc_at_best_val": "test accuracy at best val (%)",
                "best_val_acc": "best validation accuracy (%)",
                "final_val_acc": "final validation accuracy (%)"}
MAX_AUTO_LEVELS = 5


# --------------------------------------------------------------------------- numbers


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


def comparison_rows(runs: Sequence[runs_lib.Run], names: Sequence[str], metric: str,
                    levels: Sequence[float]) -> list[dict]:
    """One dict per run with the table's values (numbers unrounded, None where unknown)."""
    rows = []
    for run, name in zip(runs, names):
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
        row["path"] = str(run.path)
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


# --------------------------------------------------------------------------- tables

HEADERS = {"run": "run", "method": "method", "criteria": "criteria", "schedule": "schedule",
           "rounds": "rounds", "remaining_weight_pct": "remaining %",
           "channel_sparsity_pct": "channel sparsity %", "best_acc": "best acc %",
           "best_round": "at round"}


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def table_columns(rows: Sequence[dict]) -> list[str]:
    return [k for k in rows[0] if k != "path"] if rows else list(HEADERS)


def format_table(rows: Sequence[dict], *, markdown: bool = False) -> str:
    """Aligned text (or Markdown) table; numbers with two decimals, '-' where unknown."""
    cols = table_columns(rows)
    header = [HEADERS.get(c, c) for c in cols]
    body = [[_cell(r[c]) for c in cols] for r in rows]
    numeric = [any(isinstance(r[c], (int, float)) and not isinstance(r[c], bool) for r in rows)
               for c in cols]
    if markdown:
        sep = ["---:" if n else "---" for n in numeric]
        lines = [header, sep] + body
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n"
    widths = [max(len(x) for x in col) for col in zip(header, *body)]

    def line(cells):
        return "  ".join(c.rjust(w) if n else c.ljust(w)
                         for c, w, n in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body]) + "\n"


def write_csv(rows: Sequence[dict], path: pathlib.Path) -> None:
    cols = table_columns(rows) + ["path"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MARKERS = {"IMP": "o", "Refill": "s", "Refill+": "D", "RSST": "^", "filter": "v", "random": "x"}


def spread_ticks(values: Sequence[float], min_gap: float = 0.07) -> list[float]:
    """Tick positions from ``values`` (3 significant digits), largest first, none closer than
    ``min_gap`` of the log range to the previous one, so labels never overlap."""
    vals = sorted({float(f"{v:.3g}") for v in values if v > 0}, reverse=True)
    if len(vals) < 2:
        return vals
    span = math.log(vals[0]) - math.log(vals[-1])
    kept = [vals[0]]
    for v in vals[1:]:
        if math.log(kept[-1]) - math.log(v) >= min_gap * span:
            kept.append(v)
    if kept[-1] != vals[-1]:
        kept[-1] = vals[-1]  # the sparsest point is the one people read
    return kept


def plot_accuracy(runs: Sequence[runs_lib.Run], names: Sequence[str], metric: str,
                  path: pathlib.Path) -> None:
    """Accuracy vs remaining weights (log x, sparser to the right) and vs channel sparsity."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, (ax_w, ax_c) = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    xs_all = []
    for i, (run, name) in enumerate(zip(runs, names)):
        color = f"C{i % 10}"
        marker = MARKERS.get(run.method.split(" ")[0], "o")
        extra = [x for x in (run.method, run.criteria) if x not in ("-", name)]
        label = f"{name} ({', '.join(extra)})" if extra else name
        pts = curve(run, metric)
        if pts:
            xs_all += [p[0] for p in pts]
            ax_w.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color,
                      label=label, linewidth=1.5, markersize=6)
        cpts = curve(run, metric, "channel_sparsity_pct")
        if cpts:
            ax_c.plot([p[0] for p in cpts], [p[1] for p in cpts], marker=marker, color=color,
                      label=label, linewidth=1.5, markersize=6)
    ax_w.set_xscale("log")
    if xs_all:
        lo, hi = min(xs_all), max(xs_all)
        ax_w.set_xlim(hi * 1.08, lo / 1.08)  # reversed: sparser to the right
        ax_w.set_xticks(spread_ticks(xs_all))
        ax_w.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax_w.xaxis.set_minor_formatter(NullFormatter())
    ax_w.set_xlabel("remaining weights (%), log scale")
    ax_w.set_ylabel(SHORT_LABELS[metric])
    ax_w.set_title("accuracy vs remaining weights")
    ax_c.set_xlabel("channel sparsity (% of prunable output channels removed)")
    ax_c.set_title("accuracy vs channel sparsity")
    for ax in (ax_w, ax_c):
        ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax_w.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), frameon=False,
                   fontsize=9)
    fig.suptitle(f"{len(runs)} run(s): {METRIC_LABELS[metric]} per round")
    fig.tight_layout(rect=(0, 0.06 + 0.05 * ((len(labels) - 1) // 3), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(rows: Sequence[dict], path: pathlib.Path, metric: str) -> None:
    """Grouped bars per run: final remaining weights, channel sparsity, best accuracy."""
    plt = _pyplot()
    import numpy as np

    series = [("remaining_weight_pct", "remaining weights"),
              ("channel_sparsity_pct", "channel sparsity"),
              ("best_acc", "best " + SHORT_LABELS[metric].replace(" (%)", ""))]
    x = np.arange(len(rows))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.6 * len(rows) + 2), 4.5))
    for j, (key, label) in enumerate(series):
        vals = [r[key] if r[key] is not None else 0.0 for r in rows]
        bars = ax.bar(x + (j - 1) * width, vals, width, label=label, color=f"C{j}")
        ax.bar_label(bars, labels=[_cell(r[key]) for r in rows], fontsize=8, padding=2)
    ax.set_xticks(x, [f"{r['run']}\n{r['method']}" for r in rows], fontsize=9)
    ax.set_ylabel("%")
    ax.set_ylim(0, 125)
    ax.set_yticks(range(0, 101, 20))
    ax.set_title("each run: sparsity of its last round, best accuracy over its rounds")
    ax.legend(loc="upper center", fontsize=9, ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    p = cli.OneLineParser(
        prog="python -m experiments.compare", epilog=cli.EXIT_CODES + ".",
        description="Table (terminal, CSV, Markdown) and charts comparing runs of "
                    "python -m experiments.run. A directory that is not a run stands for the "
                    "runs directly inside it (e.g. a sweep's --out). Without --out, --plot "
                    "or --bar nothing is written.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories (--save_dir of each run)")
    p.add_argument("--out", default=None, metavar="OUT",
                   help="write the table to OUT.csv and OUT.md (default: print it only)")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="accuracy vs remaining weights (log x) and vs channel sparsity, one "
                        "line per run (default: no chart)")
    p.add_argument("--bar", metavar="FILE.png", default=None,
                   help="bar chart of each run's final remaining weights, channel sparsity and "
                        "best accuracy (default: no chart)")
    p.add_argument("--metric", choices=METRICS, default="final_test_acc",
                   help="accuracy per round used for 'best' and the matched levels; "
                        "final_test_acc is the structured ticket's accuracy for RSST")
    p.add_argument("--levels", default="auto",
                   help="remaining-weight levels (%%) for the matched-accuracy columns, e.g. "
                        "80,51.2,10.7; 'auto': the nominal levels of the first run's rate (at most 5); "
                        "'' for none")
    p.add_argument("--names", default=None,
                   help="comma-separated names for the runs, in order (default: the directory "
                        "names)")
    p.add_argument("--allow_empty", action="store_true",
                   help="also list runs that have not finished a round (skipped otherwise with a note)")
    return p


def parse_levels(text: str, runs) -> list[float]:
    if text == "auto":
        return default_levels(runs)
    try:
        levels = [float(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise cli.BadInput(f"--levels wants comma-separated percentages, got {text!r}") from None
    if any(not 0 < v <= 100 for v in levels):
        raise cli.BadInput(f"--levels must lie in (0, 100], got {text!r}")
    return levels


def load_runs(dirs: Sequence[str], *, allow_empty: bool = False, note=print) -> list[runs_lib.Run]:
    """The runs named by ``dirs`` (a non-run folder stands for the runs inside it)."""
    loaded = []
    for path in runs_lib.find_runs(list(dirs)):
        run = runs_lib.load_run(path, need_summary=False)
        if not run.summary and not allow_empty:
            note(f"note: skipping {path}: no finished round yet")
            continue
        loaded.append(run)
    return loaded


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run_command(lambda: compare(args))


def compare(args) -> int:
    """The command, parsed: print the table, write what --out, --plot and --bar ask for."""
    runs = load_runs(args.dirs, allow_empty=args.allow_empty,
                     note=lambda m: print(m, file=sys.stderr))
    if not runs:
        raise cli.BadInput(f"none of {', '.join(args.dirs)} has a finished round to compare")
    names = unique_names(runs)
    if args.names:
        given = [n.strip() for n in args.names.split(",")]
        if len(given) != len(runs):
            raise cli.BadInput(f"--names has {len(given)} names for {len(runs)} runs")
        names = given
    levels = parse_levels(args.levels, runs)
    rows = comparison_rows(runs, names, args.metric, levels)
    print(f"accuracy: {METRIC_LABELS[args.metric]}; acc@X%: interpolated at X% remaining weights")
    print(format_table(rows), end="")
    try:
        if args.out:
            out = pathlib.Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            write_csv(rows, out.with_name(out.name + ".csv"))
            out.with_name(out.name + ".md").write_text(
                f"Accuracy: {METRIC_LABELS[args.metric]}. `acc@X%`: interpolated at X% "
                f"remaining weights.\n\n" + format_table(rows, markdown=True))
            print(f"wrote {out}.csv and {out}.md")
        if args.plot:
            plot_accuracy(runs, names, args.metric, pathlib.Path(args.plot))
            print(f"wrote {args.plot}")
        if args.bar:
            plot_bars(rows, pathlib.Path(args.bar), args.metric)
            print(f"wrote {args.bar}")
    except OSError as e:
        raise cli.BadInput(f"cannot write {e.filename}: {e.strerror}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
