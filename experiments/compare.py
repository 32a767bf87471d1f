"""Compare runs: ``python -m experiments.compare DIR [DIR ...]``.

One row per run: method, criterion, schedule, rounds, final remaining weights and
channel sparsity, the best accuracy and its round, and the accuracy at matched
remaining-weight levels (interpolated in log(remaining %) between the rounds that
bracket the level). The table is printed and written as CSV and Markdown;
``--plot`` draws accuracy against remaining weights (log x) and against channel
sparsity, one line per run; ``--bar`` draws the final numbers as grouped bars.

Runs that differ only in seed (``rsst_jax.runs.group_seeds``) are one row, one line:
per round the mean and sample standard deviation over the seeds that finished the
round (``--no-group-seeds``: one row per run).

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
from typing import Sequence

import numpy as np

from experiments import cli
from experiments.compare_numbers import (  # noqa: F401  (all of them: read as compare.<name>)
    MAX_AUTO_LEVELS, Entry, SeedStat, channel_column, comparison_rows, curve,
    default_channel_levels, default_levels, level_column, matched_accuracy,
    matched_channel_accuracy, members, partial_note, seed_curve, seed_group_row, table_entries,
    unique_names)
from rsst_jax import methods
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
STAT_NOTE = "mean ± sample standard deviation over the seeds"
BAND_NOTE = "shaded: ± 1 sample standard deviation over the seeds"


# --------------------------------------------------------------------------- tables

HEADERS = {"run": "run", "method": "method", "criteria": "criteria", "schedule": "schedule",
           "rounds": "rounds", "remaining_weight_pct": "remaining %",
           "channel_sparsity_pct": "channel sparsity %", "best_acc": "best acc %",
           "best_round": "at round"}


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, SeedStat):
        text = f"{value.mean:.2f}" + (f" ± {value.std:.2f}" if value.std is not None else "")
        return text + (f" (n={value.n})" if value.n < value.of else "")
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def table_columns(rows: Sequence[dict]) -> list[str]:
    return [k for k in rows[0] if k not in ("path", "seeds")] if rows else list(HEADERS)


def has_seed_groups(rows: Sequence[dict]) -> bool:
    return any(r.get("seeds", 1) > 1 for r in rows)


def format_table(rows: Sequence[dict], *, markdown: bool = False) -> str:
    """Aligned text (or Markdown) table; numbers with two decimals, '-' where unknown."""
    cols = table_columns(rows)
    header = [HEADERS.get(c, c) for c in cols]
    body = [[_cell(r[c]) for c in cols] for r in rows]
    numeric = [any(isinstance(r[c], (int, float, SeedStat)) and not isinstance(r[c], bool)
                   for r in rows) for c in cols]
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
    """The rows as CSV. With seed groups, a ``seeds`` column follows ``run`` and each
    column holding a ``SeedStat`` becomes ``<col>_mean``, ``<col>_std`` and ``<col>_n``
    (the seeds it is over); a single run's value is then a mean over 1 with no std."""
    cols = table_columns(rows) + ["path"]
    if has_seed_groups(rows):
        stat_cols = [c for c in cols if any(isinstance(r.get(c), SeedStat) for r in rows)]
        flat = [dict(_flat_stats(r, stat_cols), seeds=r.get("seeds", 1)) for r in rows]
        cols = [x for c in cols for x in ([c, "seeds"] if c == "run" else
                                          [f"{c}_mean", f"{c}_std", f"{c}_n"] if c in stat_cols
                                          else [c])]
        rows = flat
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})


def _flat_stats(row: dict, stat_cols: Sequence[str]) -> dict:
    out = dict(row)
    for c in stat_cols:
        v = out.pop(c)
        if not isinstance(v, SeedStat):  # a single run: its value over one seed
            v = None if v is None else SeedStat(float(v), None, 1, 1)
        out.update({f"{c}_mean": None if v is None else v.mean,
                    f"{c}_std": None if v is None else v.std,
                    f"{c}_n": 0 if v is None else v.n})
    return out


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib  # start-up: 60 ms, for the figures only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # order: after the Agg backend is chosen

    return plt


def markers() -> dict[str, str]:
    """Method label -> plot marker: what each registered method asks for
    (``Method.markers``), else "o"."""
    out: dict[str, str] = {}
    for method in methods.registered():
        out.update(getattr(method, "markers", {}))
    return out


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


def _seed_line(ax, points, color, marker, label) -> list[float]:
    """A seed group's mean accuracy per round with a band of ± 1 standard deviation
    (none where one seed has the round); returns the x values."""
    xs = [p[0].mean for p in points]
    ys = [p[1].mean for p in points]
    sd = [p[1].std or 0.0 for p in points]
    ax.fill_between(xs, [y - d for y, d in zip(ys, sd)], [y + d for y, d in zip(ys, sd)],
                    color=color, alpha=0.2, linewidth=0)
    ax.plot(xs, ys, marker=marker, color=color, label=label, linewidth=1.5, markersize=6)
    return xs


def plot_accuracy(runs: Sequence[Entry], names: Sequence[str], metric: str,
                  path: pathlib.Path) -> list[str]:
    """Accuracy vs remaining weights (log x, sparser to the right) and vs channel sparsity.
    A seed group (an entry that is a sequence of runs) is one line, the mean over its
    seeds per round, in a band of ± 1 standard deviation; its legend entry says how many
    seeds. Returns the legend's texts."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter  # start-up: matplotlib, figures only

    fig, (ax_w, ax_c) = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    xs_all = []
    grouped = False
    for i, (entry, name) in enumerate(zip(runs, names)):
        group = members(entry)
        run = group[0]
        color = f"C{i % 10}"
        marker = markers().get(run.method.split(" ")[0], "o")
        extra = [x for x in (run.method, run.criteria) if x not in ("-", name)]
        if len(group) > 1:
            grouped = True
            extra.append(runs_lib.seeds_label(group))
            xs_all += _seed_line(ax_w, seed_curve(group, metric), color, marker,
                                 f"{name} ({', '.join(extra)})")
            _seed_line(ax_c, seed_curve(group, metric, "channel_sparsity_pct"), color, marker,
                       f"{name} ({', '.join(extra)})")
            continue
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
    if grouped:
        total = sum(len(members(e)) for e in runs)
        fig.suptitle(f"{total} runs in {len(runs)} line(s): {METRIC_LABELS[metric]} per round, "
                     f"mean over seeds; {BAND_NOTE}", fontsize=10)
    else:
        fig.suptitle(f"{len(runs)} run(s): {METRIC_LABELS[metric]} per round")
    fig.tight_layout(rect=(0, 0.06 + 0.05 * ((len(labels) - 1) // 3), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return list(labels)


def plot_bars(rows: Sequence[dict], path: pathlib.Path, metric: str) -> None:
    """Grouped bars per run: final remaining weights, channel sparsity, best accuracy."""
    plt = _pyplot()
    series = [("remaining_weight_pct", "remaining weights"),
              ("channel_sparsity_pct", "channel sparsity"),
              ("best_acc", "best " + SHORT_LABELS[metric].replace(" (%)", ""))]
    x = np.arange(len(rows))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.6 * len(rows) + 2), 4.5))
    for j, (key, label) in enumerate(series):
        vals = [r[key] if r[key] is not None else 0.0 for r in rows]
        if not any(isinstance(v, SeedStat) for v in vals):
            bars = ax.bar(x + (j - 1) * width, vals, width, label=label, color=f"C{j}")
            ax.bar_label(bars, labels=[_cell(r[key]) for r in rows], fontsize=8, padding=2)
            continue
        # seed groups: the mean, an error bar of ± 1 standard deviation
        means = [v.mean if isinstance(v, SeedStat) else v for v in vals]
        errs = [(v.std or 0.0) if isinstance(v, SeedStat) else np.nan for v in vals]  # nan: no bar
        bars = ax.bar(x + (j - 1) * width, means, width, yerr=errs, capsize=3, label=label,
                      color=f"C{j}")
        ax.bar_label(bars, labels=[_cell(v.mean if isinstance(v, SeedStat) else r[key])
                                   for v, r in zip(vals, rows)], fontsize=8, padding=2)
    ax.set_xticks(x, [f"{r['run']}\n{r['method']}" for r in rows], fontsize=9)
    ax.set_ylabel("%")
    ax.set_ylim(0, 125)
    ax.set_yticks(range(0, 101, 20))
    ax.set_title("each run: sparsity of its last round, best accuracy over its rounds"
                 + ("\nseed groups: mean over the seeds, error bar ± 1 sample standard deviation"
                    if has_seed_groups(rows) else ""))
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
                    "runs directly inside it (e.g. a sweep's --out or a --num_seeds SAVE_DIR). "
                    "Runs that differ only in seed are one row: mean ± sample standard "
                    "deviation over the seeds per round. Without --out, --plot or --bar "
                    "nothing is written.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories (--save_dir of each run)")
    p.add_argument("--out", default=None, metavar="OUT",
                   help="write the table to OUT.csv and OUT.md (default: print it only)")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="accuracy vs remaining weights (log x) and vs channel sparsity, one "
                        "line per run; an existing folder gets FOLDER/accuracy.png (default: "
                        "no chart)")
    p.add_argument("--bar", metavar="FILE.png", default=None,
                   help="bar chart of each run's final remaining weights, channel sparsity and "
                        "best accuracy; an existing folder gets FOLDER/bars.png (default: no "
                        "chart)")
    p.add_argument("--metric", choices=METRICS, default="final_test_acc",
                   help="accuracy per round used for 'best' and the matched levels; "
                        "final_test_acc is the structured ticket's accuracy for RSST")
    p.add_argument("--levels", default="auto",
                   help="remaining-weight levels (%%) for the matched-accuracy columns, e.g. "
                        "80,51.2,10.7; 'auto': the nominal levels of the first run's rate (at most 5); "
                        "'' for none")
    p.add_argument("--channel_levels", default="",
                   help="channel-sparsity levels (%%) for matched-accuracy columns acc@chX%%, "
                        "interpolated linearly between the rounds that bracket X, e.g. 35,58; "
                        "'auto': the nominal levels of the first run's rate, 100 (1 - (1 - "
                        "rate)^k) (default: none)")
    p.add_argument("--names", default=None,
                   help="comma-separated names for the runs, in order, or one per row where "
                        "runs differing only in seed form one row (default: the directory "
                        "names)")
    p.add_argument("--allow_empty", action="store_true",
                   help="also list runs that have not finished a round (skipped otherwise with a note)")
    p.add_argument("--no-group-seeds", dest="group_seeds", action="store_false",
                   help="one row (and line) per run, also for runs that differ only in seed "
                        "(default: such runs are one row, 'NAME (k seeds)', of mean ± sample "
                        "standard deviation over the seeds per round, and one line with a "
                        "± 1 std band)")
    cli.add_import_flag(p)
    return p


def parse_levels(text: str, runs, flag: str = "--levels", auto=default_levels) -> list[float]:
    if text == "auto":
        return auto(runs)
    try:
        levels = [float(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise cli.BadInput(f"{flag} wants comma-separated percentages, got {text!r}") from None
    if flag == "--levels" and any(not 0 < v <= 100 for v in levels):
        raise cli.BadInput(f"--levels must lie in (0, 100], got {text!r}")
    if any(not 0 <= v < 100 for v in levels):
        raise cli.BadInput(f"{flag} must lie in [0, 100), got {text!r}")
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
    return cli.run_command(lambda: compare(args), imports=args.imports)


def figure_path(given: str, name: str) -> pathlib.Path:
    """The file a chart given as ``given`` goes to: ``given/name`` for an existing folder,
    ``given.png`` without a suffix (as matplotlib would write it), else ``given``."""
    path = pathlib.Path(given)
    if path.is_dir():
        return path / name
    return path if path.suffix else path.with_name(path.name + ".png")


def compare(args) -> int:
    """The command, parsed: print the table, write what --out, --plot and --bar ask for."""
    runs = load_runs(args.dirs, allow_empty=args.allow_empty,
                     note=lambda m: print(m, file=sys.stderr))
    if not runs:
        raise cli.BadInput(f"none of {', '.join(args.dirs)} has a finished round to compare")
    names = unique_names(runs)
    entries, entry_names = table_entries(runs, names, group=args.group_seeds,
                                         note=lambda m: print(m, file=sys.stderr))
    if args.names:
        given = [n.strip() for n in args.names.split(",")]
        if len(given) == len(runs):  # one per run: seed groups named from them
            entries, entry_names = table_entries(runs, given, group=args.group_seeds)
        elif len(given) == len(entries):  # one per row
            entry_names = given
        else:
            rows_too = f" ({len(entries)} rows)" if len(entries) != len(runs) else ""
            raise cli.BadInput(f"--names has {len(given)} names for {len(runs)} runs{rows_too}")
    levels = parse_levels(args.levels, runs)
    channel_levels = parse_levels(args.channel_levels, runs, "--channel_levels",
                                  default_channel_levels)
    rows = comparison_rows(entries, entry_names, args.metric, levels, channel_levels)
    chan = "; acc@chX%: interpolated at X% channel sparsity" if channel_levels else ""
    notes = [n for n in (partial_note(name, e) for e, name in zip(entries, entry_names)) if n]
    print(f"accuracy: {METRIC_LABELS[args.metric]}; acc@X%: interpolated at X% remaining weights"
          + chan + (f"; seed groups: {STAT_NOTE}" if has_seed_groups(rows) else ""))
    print(format_table(rows), end="")
    for line in notes:
        print(line)
    try:
        if args.out:
            out = pathlib.Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            write_csv(rows, out.with_name(out.name + ".csv"))
            seeds = (f" Seed groups: {STAT_NOTE} (n-1 in the denominator); (n=k): over the k "
                     f"seeds that have the value." if has_seed_groups(rows) else "")
            out.with_name(out.name + ".md").write_text(
                f"Accuracy: {METRIC_LABELS[args.metric]}. `acc@X%`: interpolated at X% "
                f"remaining weights."
                + (" `acc@chX%`: interpolated at X% channel sparsity." if channel_levels else "")
                + f"{seeds}\n\n" + format_table(rows, markdown=True)
                + "".join(f"\nNote{line[len('note'):]}\n" for line in notes))
            print(f"wrote {out}.csv and {out}.md")
        if args.plot:
            path = figure_path(args.plot, "accuracy.png")
            plot_accuracy(entries, entry_names, args.metric, path)
            print(f"wrote {path}")
        if args.bar:
            path = figure_path(args.bar, "bars.png")
            plot_bars(rows, path, args.metric)
            print(f"wrote {path}")
    except OSError as e:
        raise cli.BadInput(f"cannot write {e.filename}: {e.strerror}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
