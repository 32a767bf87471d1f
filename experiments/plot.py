"""Plot one run per directory: ``python -m experiments.plot DIR [DIR ...]``.

Writes into ``DIR/plots/`` (or ``--out``):

* ``rounds.png``   per round: remaining weights and channel sparsity (left axis) and
  test accuracy (right axis, the same 0-100 scale; for rounds that ended by removing
  channels, such as RSST's, also the accuracy before, a hollow circle around the
  accuracy after);
* ``method.png``   one panel per epoch metric the run's method declares plotted
  (``Method.metrics``; RSST: the lambda applied, the L2 norm of the penalized weights
  relative to the round's start, the fraction of them below 1e-3), one line per round
  (skipped for runs whose method logs none);
* ``channels.png`` per prunable layer and round: fraction of output channels kept and
  of weights kept (read from the ``round_<r>/final`` checkpoints); where rounds ended by
  applying channel masks S (RSST), whose final tickets keep whole channels, the second
  panel is the weights kept by the kernel mask M the round trained with
  (``round_<r>/best``), and where the two are the same numbers (Refill) there is one
  panel;
* ``epochs.png``   training curves over all epochs of all rounds.

A directory that is not a run stands for the runs inside it (a ``--num_seeds`` SAVE_DIR,
a sweep's ``--out``). Runs that differ only in seed (``rsst_jax.runs.group_seeds``) also
get one ``rounds.png`` for the group: per round the mean over the seeds that finished
it, in a band of ± 1 sample standard deviation (in ``SAVE_DIR/plots/`` for a
``--num_seeds`` SAVE_DIR, else in ``PARENT/plots/NAME/``, or ``--out``/NAME).

Exit codes: 0 done, 2 bad input (one line on stderr: also a damaged checkpoint, named).
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import textwrap
from typing import Optional, Sequence

import numpy as np

from experiments import cli
from rsst_jax import masks as masks_lib
from rsst_jax import metrics as metrics_lib
from rsst_jax import paths as paths_lib
from rsst_jax import runs as runs_lib
from rsst_jax import tickets
from rsst_jax.methods import find_method

PLOTS = ("rounds", "method", "channels", "epochs")


def _pyplot():
    import matplotlib  # start-up: 60 ms, for the figures only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # order: after the Agg backend is chosen

    return plt


def _title(run: runs_lib.Run, name: Optional[str] = None) -> str:
    c = run.config
    parts = [run.name if name is None else name, run.method]
    if run.criteria != "-":
        parts.append(f"criteria {run.criteria}")
    if run.schedule != "-":
        parts.append(f"schedule {run.schedule}")
    if c.get("arch"):
        parts.append(f"{c.get('arch')} on {c.get('dataset', '?')}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- (a) rounds


# (summary key, left or right axis, format, style, legend label) of each line of rounds.png
ROUND_LINES = (
    ("remaining_weight_pct", "left", "o-", dict(color="C0"), "remaining weights %"),
    ("channel_sparsity_pct", "left", "s-", dict(color="C1"), "channel sparsity %"),
    ("final_test_acc", "right", "^-", dict(color="C2"), "final test accuracy %"),
    ("test_acc_at_best_val", "right", "v--", dict(color="C2", alpha=0.6),
     "test accuracy at best val %"),
    # Hollow and drawn on top: where removing channels cost nothing, the after-S point
    # (the final test accuracy) shows through it.
    ("acc_before_s", "right", "o", dict(color="C3", markersize=11, fillstyle="none",
                                        markeredgewidth=1.5, zorder=5),
     "test accuracy before removing channels % (after: final test accuracy)"),
)

Y_LIMITS = (-3, 105)  # both axes of rounds.png: a value reads the same against either


def plot_rounds(run: runs_lib.Run, path: pathlib.Path) -> list[str]:
    """Remaining weights and channel sparsity (left) and test accuracy (right) per round;
    returns the legend's texts."""
    lines, rounds = round_lines(run)
    return _draw_rounds(lines, rounds, _title(run), path)


def round_lines(run: runs_lib.Run) -> tuple[dict, list[int]]:
    """(lines, rounds) of ``rounds_figure`` for one run."""
    val = runs_lib.summary_value
    rounds = [int(r["round"]) for r in run.summary]
    lines = {}
    for key, *_ in ROUND_LINES:
        if key == "acc_before_s":  # only the rounds that removed channels
            pts = [(int(r["round"]), val(r, key)) for r in run.summary if val(r, key) is not None]
            lines[key] = ([p[0] for p in pts], [p[1] for p in pts], None)
        else:
            lines[key] = (rounds, [val(r, key) for r in run.summary], None)
    return lines, rounds


def plot_seed_rounds(group: Sequence[runs_lib.Run], name: str, path: pathlib.Path) -> list[str]:
    """``plot_rounds`` of a seed group: per round the mean over the seeds that finished
    it, in a band of ± 1 sample standard deviation; the title and legend say how many
    seeds (and the rounds not every seed has finished). Returns the legend's texts."""
    lines = {}
    for key, *_ in ROUND_LINES:
        stats = runs_lib.round_stats(group, key)
        lines[key] = (list(stats), [s.mean for s in stats.values()],
                      [s.std or 0.0 for s in stats.values()])
    rounds = sorted({int(r["round"]) for run in group for r in run.summary})
    partial = runs_lib.partial_rounds(group)
    title = _title(group[0], f"{name} ({runs_lib.seeds_label(group)})")
    if partial:
        title += "\n" + ", ".join(f"round {r}: {n}" for r, n in partial.items()) + \
            f" of {len(group)} seeds finished"
    band = f"shaded: ± 1 sample standard deviation over the {runs_lib.seeds_label(group)}"
    return _draw_rounds(lines, rounds, title, path, band=band)


def _draw_rounds(lines: dict, rounds: list[int], title: str, path: pathlib.Path,
                 band: Optional[str] = None) -> list[str]:
    """rounds.png from ``lines`` (see ``rounds_figure``); returns the legend's texts."""
    plt = _pyplot()
    fig, labels = rounds_figure(lines, rounds, title, band)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return labels


def rounds_figure(lines: dict, rounds: list[int], title: str, band: Optional[str] = None):
    """(figure, legend texts) of rounds.png from ``lines``: summary key -> (rounds, values,
    standard deviations or None); a band of ± the deviation around a line that has them.
    Both y axes span ``Y_LIMITS`` with the same ticks, so the grid serves both."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    acc = ax.twinx()
    for key, side, fmt, style, label in ROUND_LINES:
        xs, ys, sds = lines[key]
        if key == "acc_before_s" and not xs:
            continue
        axis = ax if side == "left" else acc
        axis.plot(xs, ys, fmt, label=label, **style)
        if sds is not None:
            axis.fill_between(xs, [y - d for y, d in zip(ys, sds)],
                              [y + d for y, d in zip(ys, sds)], color=style["color"], alpha=0.15,
                              linewidth=0)
    ax.set_xlabel("round")
    ax.set_ylabel("% of prunable weights / channels")
    ax.set_xticks(rounds)
    ax.grid(True, alpha=0.3)
    acc.set_ylabel("test accuracy (%)", color="C2")
    acc.tick_params(axis="y", colors="C2")
    ticks = list(range(0, 101, 20))
    for axis in (ax, acc):
        axis.set_ylim(*Y_LIMITS)
        axis.set_yticks(ticks)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = acc.get_legend_handles_labels()
    handles, labels = h1 + h2, l1 + l2
    if band is not None:
        from matplotlib.patches import Patch  # start-up: matplotlib, for the figures only
        handles.append(Patch(color="grey", alpha=0.3))
        labels.append(band)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8.5, frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig, labels


# --------------------------------------------------------------------------- (b) method


def method_panels(run: runs_lib.Run) -> tuple[list, dict[int, list[dict]]]:
    """(the plotted epoch metrics the run's method declares, log rows by round of the
    rounds that logged one of them)."""
    panels = [m for m in metrics_lib.of_method(find_method(run.config.get("struct")),
                                               metrics_lib.EPOCH_ROW) if m.plot]
    by_round = {}
    for r in sorted({row["round"] for row in run.log}):
        rows = [row for row in run.epochs(r)
                if any(row.get(m.key) is not None for m in panels)]
        if rows:
            by_round[r] = rows
    return panels, by_round


def plot_method(run: runs_lib.Run, path: pathlib.Path) -> bool:
    """The method's epoch metrics per round (one panel each); False when there are none."""
    panels, by_round = method_panels(run)
    if not by_round:
        return False
    plt = _pyplot()
    from matplotlib import cm, colors  # start-up: matplotlib, for the figures only
    from matplotlib.ticker import MaxNLocator  # start-up: matplotlib, for the figures only

    fig, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 4.4), squeeze=False)
    axes = list(axes[0])
    many = len(by_round) > 8
    norm = colors.Normalize(min(by_round), max(by_round))
    values: dict[str, list] = {m.key: [] for m in panels}
    styles = ("-", "--", ":", "-.")
    markers = ("o", "s", "^", "v", "D")
    for k, (r, rows) in enumerate(by_round.items()):
        color = cm.viridis(norm(r)) if many else f"C{k % 10}"
        # Rounds of one run share the schedule, so their lines coincide: vary the style.
        style = dict(linestyle=styles[k % len(styles)], marker=markers[k % len(markers)],
                     markersize=4 + 2 * ((len(by_round) - 1 - k) % 3))
        epochs = [row["epoch"] for row in rows]  # from 1, as on the screen
        for ax, m in zip(axes, panels):
            ys = [row.get(m.key) for row in rows]
            ax.plot(epochs, ys, color=color, label=f"round {r}", **style)
            values[m.key] += [y for y in ys if y is not None]
    for ax, m in zip(axes, panels):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch of the round")
        ax.set_ylabel(m.label)
        ax.set_title(m.label, fontsize=10)
        ax.grid(True, alpha=0.3)
        positive = [v for v in values[m.key] if v > 0]
        if m.log_scale and positive and max(positive) / min(positive) > 100:
            ax.set_yscale("log")
    if many:
        fig.colorbar(cm.ScalarMappable(norm=norm, cmap="viridis"), ax=axes, label="round",
                     shrink=0.8)
    else:
        axes[0].legend(fontsize=8)
    fig.suptitle(f"{run.method} as it trained: {_title(run)}", fontsize=11)
    if not many:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- (c) channels


def layer_table(run: runs_lib.Run, kind: str = paths_lib.FINAL) -> tuple:
    """(layers, rounds, channels kept, weights kept) from the ``kind`` (final or best)
    checkpoints: the last two are float arrays [layers, rounds] of fractions (NaN where a
    round lacks the layer)."""
    refs = [r for r in run.checkpoints() if r.kind == kind]
    if not refs:
        raise tickets.TicketError(f"{run.path} has no round_<r>/{kind} checkpoint to read masks "
                                  f"from")
    layers: list[str] = []
    per_round = []
    for ref in refs:
        arrays, _, _ = tickets.read(ref)
        if arrays["masks"] is None:
            raise tickets.TicketError(f"{ref.path} holds no masks")
        rows = masks_lib.report(arrays["masks"])
        per_round.append({row.path: row for row in rows})
        for row in rows:
            if row.path not in layers:
                layers.append(row.path)
    ch = np.full((len(layers), len(refs)), np.nan)
    wt = np.full((len(layers), len(refs)), np.nan)
    for j, rows in enumerate(per_round):
        for i, layer in enumerate(layers):
            row = rows.get(layer)
            if row is not None:
                ch[i, j] = row.channels_kept / max(1, row.channels_total)
                wt[i, j] = row.kept / max(1, row.total)
    return layers, [r.round for r in refs], ch, wt


def channel_panels(run: runs_lib.Run) -> tuple:
    """(layers, rounds, [(title, data [layers, rounds])]) of channels.png: channels kept,
    then weights kept where that says something else. A channel-wise final ticket keeps
    whole channels, so its weights kept are its channels kept: for RSST the second panel
    shows the kernel mask M the round trained with (its best-validation checkpoint)
    where rounds ended by applying S (RSST), and there is no second panel where the two
    are the same (Refill)."""
    layers, rounds, ch, wt = layer_table(run)
    panels = [("fraction of output channels kept", ch)]
    if any("acc_after_s" in row for row in run.summary):  # rounds that ended by applying S
        best_layers, best_rounds, _, trained = layer_table(run, paths_lib.BEST)
        if best_layers == layers and best_rounds == rounds:
            panels.append(("fraction of weights kept by the kernel mask M the round "
                           "trained with (the final ticket keeps whole channels)", trained))
    elif not np.array_equal(ch, wt, equal_nan=True):
        panels.append(("fraction of weights kept", wt))
    return layers, rounds, panels


def plot_channels(run: runs_lib.Run, path: pathlib.Path) -> None:
    """channels.png: ``channels_figure`` saved."""
    plt = _pyplot()
    fig = channels_figure(run)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def channels_figure(run: runs_lib.Run):
    """Heatmaps layers x rounds of ``channel_panels``."""
    plt = _pyplot()
    layers, rounds, panels = channel_panels(run)
    names = [name[: -len("/kernel")] if name.endswith("/kernel") else name for name in layers]
    height = max(3.5, 0.28 * len(layers) + 1.8)
    width = max(8.0 if len(panels) == 2 else 5.0,
                len(panels) * (0.45 * len(rounds) + 1.5) + 3.0)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, height), sharey=True,
                             squeeze=False)
    axes = list(axes[0])
    annotate = len(rounds) <= 12
    if len(panels) == 1:
        panels = [(panels[0][0] + " (= fraction of weights kept: whole channels)",
                   panels[0][1])]
    wrap = max(30, int(12 * (width / len(panels) - 1.5)))  # characters per title line
    panels = [(textwrap.fill(title, wrap), data) for title, data in panels]
    title_lines = max(title.count("\n") + 1 for title, _ in panels)
    for ax, (title, data) in zip(axes, panels):
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                       interpolation="nearest")
        ax.set_xticks(range(len(rounds)), [str(r) for r in rounds])
        ax.set_xlabel("round")
        ax.set_title(title, fontsize=10)
        if annotate:
            for i in range(data.shape[0]):
                for j in range(data.shape[1]):
                    v = data[i, j]
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if v > 0.6 else "white")
    axes[0].set_yticks(range(len(names)), names, fontsize=8)
    fig.colorbar(im, ax=axes, label="fraction kept", shrink=0.9)
    fig.suptitle(f"per-layer masks of each round\n{_title(run)}", fontsize=10,
                 y=1.0 + 0.25 * title_lines / height)  # above the panels' titles
    return fig


# --------------------------------------------------------------------------- (d) epochs


def plot_epochs(run: runs_lib.Run, path: pathlib.Path) -> None:
    """epochs.png: ``epochs_figure`` saved."""
    plt = _pyplot()
    fig = epochs_figure(run)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def epochs_figure(run: runs_lib.Run):
    """Train/val/test accuracy over all epochs (integer ticks); dotted lines separate the
    rounds."""
    plt = _pyplot()
    rows = sorted(run.log, key=lambda r: (r["round"], r["epoch"]))
    x = list(range(1, len(rows) + 1))
    fig, ax = plt.subplots(figsize=(10, 4.8))
    for key, label, style in (("train_acc", "train", "-"), ("val_acc", "validation", "-"),
                              ("test_acc", "test", "--")):
        ax.plot(x, [r.get(key) for r in rows], style, label=label, marker="." if len(x) < 60 else None)
    boundaries = [i + 0.5 for i in range(1, len(rows)) if rows[i]["round"] != rows[i - 1]["round"]]
    for b in boundaries:
        ax.axvline(b, color="grey", linestyle=":", linewidth=1)
    starts = [1] + [int(b + 0.5) for b in boundaries]
    for s in starts:
        ax.text(s, 101.5, f"round {rows[s - 1]['round']}", fontsize=8, color="dimgrey")
    from matplotlib.ticker import MaxNLocator  # start-up: matplotlib, for the figures only
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs only
    ax.set_ylim(0, 107)
    ax.set_xlabel("epoch (all rounds, in order)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"training curves: {_title(run)}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- command


def plot_run(run: runs_lib.Run, out: pathlib.Path, which: Sequence[str], log=print) -> list[pathlib.Path]:
    """Write the chosen plots of ``run`` into ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in which:
        path = out / f"{name}.png"
        if name == "rounds":
            plot_rounds(run, path)
        elif name == "method":
            if not plot_method(run, path):
                log(f"{run.name}: its method logged no epoch metric to plot, so no method.png")
                continue
        elif name == "channels":
            plot_channels(run, path)
        elif name == "epochs":
            if not run.log:
                log(f"{run.name}: empty log.jsonl, so no epochs.png")
                continue
            plot_epochs(run, path)
        written.append(path)
        log(f"wrote {path}")
    return written


def build_parser() -> argparse.ArgumentParser:
    p = cli.OneLineParser(
        prog="python -m experiments.plot", epilog=cli.EXIT_CODES + ".",
        description="PNG plots of runs of python -m experiments.run: " + "; ".join((
            "rounds.png (remaining weights, channel sparsity and test accuracy per round)",
            "method.png (the method's own epoch metrics per round, e.g. RSST's lambda and the "
            "penalized weights' norm)",
            "channels.png (per-layer fraction of channels and weights kept, per round)",
            "epochs.png (training curves)")))
    p.add_argument("dirs", nargs="+", metavar="DIR",
                   help="run directories; a directory that is not a run stands for the runs "
                        "inside it (a --num_seeds SAVE_DIR, a sweep's --out)")
    p.add_argument("--out", default=None,
                   help=f"output folder (default: DIR/{paths_lib.PLOTS}; with several runs "
                        f"OUT/<run name>, and OUT/<group name> for a seed group)")
    p.add_argument("--only", default=",".join(PLOTS),
                   help=f"comma-separated subset of {', '.join(PLOTS)}")
    p.add_argument("--no-group-seeds", dest="group_seeds", action="store_false",
                   help="no rounds.png of mean and band for runs that differ only in seed "
                        "(default: one for each such group, besides each run's own plots)")
    cli.add_import_flag(p)
    return p


def seed_group_dir(group: Sequence[runs_lib.Run], out: Optional[str]) -> pathlib.Path:
    """Where a seed group's plots go: OUT/NAME with --out; else the plots folder of the
    folder holding the seeds when they are all of it (a --num_seeds SAVE_DIR), or
    PARENT/plots/NAME (a sweep's seed cells)."""
    name = runs_lib.seed_group_name(group, [r.name for r in group])
    if out is not None:
        return pathlib.Path(out) / name
    parent = group[0].path.parent
    whole = all(runs_lib.strip_seed(r.name) == "" and r.path.parent == parent for r in group)
    return paths_lib.RunPaths.of(parent).plots / ("" if whole else name)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run_command(lambda: plot(args), imports=args.imports)


def plot(args) -> int:
    """The command, parsed: every chosen plot of every run."""
    which = [w.strip() for w in args.only.split(",") if w.strip()]
    bad = [w for w in which if w not in PLOTS]
    if bad or not which:
        raise cli.BadInput(f"--only takes some of {', '.join(PLOTS)}; got {args.only!r}")
    runs = [runs_lib.load_run(p) for p in runs_lib.find_runs(list(args.dirs))]
    groups = [g for g in runs_lib.group_seeds(runs, note=lambda m: print(m, file=sys.stderr))
              if len(g) > 1] if args.group_seeds and "rounds" in which else []
    try:
        for run in runs:
            if args.out is None:
                out = paths_lib.RunPaths.of(run.path).plots
            else:
                out = pathlib.Path(args.out) / (run.name if len(runs) > 1 else "")
            plot_run(run, out, which)
        for group in groups:
            path = seed_group_dir(group, args.out) / "rounds.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            plot_seed_rounds(group, runs_lib.seed_group_name(group, [r.name for r in group]),
                             path)
            print(f"wrote {path}")
    except OSError as e:
        if e.filename is None:
            raise
        raise cli.BadInput(f"cannot write {e.filename}: {e.strerror}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
