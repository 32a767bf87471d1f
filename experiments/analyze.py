"""Open one checkpoint: ``python -m experiments.analyze CHECKPOINT_OR_DIR``.

Prints the per-layer mask table (``rsst_jax.masks.report``), total and prunable
parameters, what the network would cost with the pruned channels removed (parameters
and FLOPs, from ``rsst_jax.counting.compact_stats``), and the round's accuracies; ``--json`` prints
one JSON object instead.

The path may be a run directory (its last round's final ticket; ``--round``/``--best``
choose another), a ``round_<r>`` folder, a checkpoint folder or one step of it. The
checkpoint's own metadata names the network; where it does not (best-validation
checkpoints), the run's ``config.json`` or a final checkpoint beside it does, and
``--arch``/``--dataset`` supply them when the checkpoint was copied out of its run.

Exit codes: 0 done, 2 bad input (one line on stderr: also a damaged checkpoint, named).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Optional, Sequence

import numpy as np

from experiments import cli
from rsst_jax import counting, tickets
from rsst_jax import data as data_lib
from rsst_jax import masks as masks_lib
from rsst_jax import metrics as metrics_lib
from rsst_jax import paths as paths_lib
from rsst_jax import runs as runs_lib
from rsst_jax.counting import compact_stats
from rsst_jax.methods import find_method


# --------------------------------------------------------------------------- numbers


def fallback_compact(params: dict, masks: dict) -> dict:
    """Parameters if pruned channels were removed, counted per layer without the graph
    (``rsst_jax.counting.layerwise_compact_params``, an upper bound); no FLOPs."""
    return {"params": counting.count_params(params),
            "compact_params": counting.layerwise_compact_params(params, masks),
            "flops": None, "compact_flops": None,
            "method": "per-layer count (rsst_jax.compact unavailable)"}


def compact_numbers(model, variables: dict, masks: dict, input_shape, *, approximate: bool) -> dict:
    """``rsst_jax.counting.compact_stats`` where it can follow the network, else the per-layer count."""
    if model is None or input_shape is None:
        return fallback_compact(variables["params"], masks)
    try:
        stats = compact_stats(model, variables, masks, tuple(input_shape), approximate=approximate)
    except Exception as e:  # a network compact cannot rebuild still gets the simple count
        out = fallback_compact(variables["params"], masks)
        out["method"] = f"per-layer count (rsst_jax.compact failed: {e.__class__.__name__}: {e})"
        return out
    stats = {k: (v.item() if hasattr(v, "item") else v) for k, v in stats.items()}
    stats["method"] = "rsst_jax.compact" + (" (approximate)" if approximate else "")
    return stats


KEPT_REASONS = (  # rsst_jax.channel_flow.RemovalPlan.dead_kept_reasons
    ("shared", "share a residual stream that a live layer also writes"),
    ("constant", "their BatchNorm adds a constant: train with --mask_bn, or --approximate "
                 "removes them"),
    ("width", "kept so that a layer keeps a channel"),
    ("pinned", "touched by an op compaction cannot follow"))


def kept_reasons(c: dict) -> str:
    """Why pruned channels stay, by count: '135 share a residual stream ...; 4 ...'."""
    why = c.get("pruned_channels_kept_why") or {}
    parts = [f"{why[key]} {text}" for key, text in KEPT_REASONS if why.get(key)]
    return "; ".join(parts) or "not removable"


def accuracies(ref, meta: dict) -> dict:
    """The round's accuracies: the final checkpoint's summary row, else the run's summary."""
    row = dict(meta.get("summary") or {})
    if not row and ref.run_dir is not None and ref.round is not None:
        try:
            run = runs_lib.load_run(ref.run_dir, need_summary=False)
            row = next((r for r in run.summary if r.get("round") == ref.round), {})
        except runs_lib.RunDirError:
            row = {}
    keys = ("best_val_acc", "best_val_epoch", "test_acc_at_best_val", "final_val_acc",
            "final_test_acc", "acc_before_s", "acc_after_s", "remaining_weight_pct",
            "channel_sparsity_pct")
    row = metrics_lib.renamed(row)
    out = {k: row[k] for k in keys if row.get(k) is not None}
    if ref.kind == paths_lib.BEST:
        out.update({f"checkpoint_{k}": meta[k] for k in ("epoch", "val_acc", "test_acc") if k in meta})
    return out


def kept_zero_note(kept: int, nonzero: int, prunable: int, *, reason: Optional[str] = None
                   ) -> Optional[str]:
    """Why the mask keeps more weights than are non-zero, or None when it does not;
    ``reason``: what the run tells of it (``zero_weights_reason``)."""
    if nonzero >= kept:
        return None
    text = (f"{kept - nonzero:,} of the {kept:,} kept weights are exactly zero (non-zero: "
            f"{nonzero:,}, {100.0 * nonzero / max(1, prunable):.2f}% of the prunable weights)")
    return text + (f": {reason}" if reason else ": the masks keep them, but their values are zero")


def zero_weights_reason(summary_row: dict) -> Optional[str]:
    """Why a round's final ticket keeps weights that are exactly zero: a round that ended
    by applying its channel masks S (the row has the accuracy after it) trained with
    kernel masks M inside S's channels; None for other rounds."""
    if "acc_after_s" not in summary_row:
        return None
    return ("the round ended by setting its mask to the channel mask S, which keeps whole "
            "channels, but it trained with the kernel mask M, which held the weights it "
            "prunes inside those channels at zero; they count as kept because their "
            "channels stay")


def analyze(path, *, round_idx=None, best=False, arch=None, dataset=None, input_shape=None,
            approximate=False) -> dict:
    """Everything ``main`` prints, as a JSON-able dict."""
    ticket = tickets.load(path, round_idx=round_idx, kind=paths_lib.BEST if best else paths_lib.FINAL,
                          arch=arch, dataset=dataset, image_shape=input_shape, need_model=False)
    ref, meta, params, net = ticket.ref, ticket.meta, ticket.params, ticket.network
    masks = ticket.masks
    notes = []
    if masks is None:
        masks = masks_lib.init_masks(params)
        notes.append("the checkpoint has no masks (an initialization): every prunable weight counts as kept")
    try:
        masks_lib.check_masks(params, masks)
    except ValueError as e:
        raise cli.BadInput(f"{ref.path}: masks do not fit the parameters ({e})") from None
    masks = masks_lib.map_prunable(lambda m: np.asarray(m, bool), masks)
    rows = masks_lib.report(masks, params)
    if ticket.model is None:
        flags = {"arch": "--arch", "image_shape": "--dataset or --input_shape"}
        notes.append(f"FLOPs need the network: pass {' and '.join(flags[m] for m in net.missing())}")
    total = counting.count_params(params)
    prunable = sum(r.total for r in rows)
    kept = sum(r.kept for r in rows)
    acc = accuracies(ref, meta)
    reason = zero_weights_reason(acc) if ref.kind == paths_lib.FINAL else None
    declared = metrics_lib.of_method(find_method(ticket.config.get("struct")),
                                     metrics_lib.ROUND_ROW)
    row = metrics_lib.renamed(dict(meta.get("summary") or {}))
    method_values = {m.label: row[m.key] for m in declared
                     if isinstance(row.get(m.key), (int, float))}
    zero_note = kept_zero_note(kept, sum(r.nonzero for r in rows), prunable, reason=reason)
    if zero_note:
        notes.append(zero_note)
    return {
        "checkpoint": str(ref.path), "kind": ref.kind, "round": ref.round, "step": ref.step,
        "arch": net.arch, "arch_from": net.sources.get("arch"), "dataset": net.dataset,
        "num_classes": net.num_classes,
        "input_shape": list(net.image_shape) if net.image_shape else None,
        "layers": [dict(dataclasses.asdict(r), shape=list(r.shape)) for r in rows],
        "params": {"total": total, "prunable": prunable, "prunable_kept": kept,
                   "remaining_weight_pct": 100.0 * kept / prunable if prunable else 100.0,
                   "channel_sparsity_pct": 100.0 * masks_lib.channel_sparsity(masks)},
        "compact": compact_numbers(ticket.model, ticket.variables, masks, net.image_shape,
                                   approximate=approximate),
        "accuracy": acc,
        "method_values": method_values,
        "notes": notes,
        "_rows": rows,
    }


# --------------------------------------------------------------------------- text


def _millions(n) -> str:
    return "-" if n is None else f"{n / 1e6:.3f}M"


def format_text(result: dict) -> str:

    r = result
    where = f"round {r['round']}, {r['kind']}" if r["round"] is not None else r["kind"]
    lines = [f"checkpoint: {r['checkpoint']} ({where})"]
    if r["arch"]:
        shape = "x".join(map(str, r["input_shape"])) if r["input_shape"] else "?"
        lines.append(f"network: {r['arch']} (from {r['arch_from']}), {r['num_classes']} classes, "
                     f"input {shape}" + (f", data set {r['dataset']}" if r["dataset"] else ""))
    lines += ["", masks_lib.format_report(r["_rows"]), ""]
    p = r["params"]
    lines.append(f"parameters: {p['total']:,} in total, {p['prunable']:,} prunable "
                 f"({100.0 * p['prunable'] / max(1, p['total']):.1f}%), {p['prunable_kept']:,} of "
                 f"them kept ({p['remaining_weight_pct']:.2f}%); channel sparsity "
                 f"{p['channel_sparsity_pct']:.2f}%")
    c = r["compact"]
    text = (f"with the pruned channels removed [{c['method']}]: parameters {c['params']:,} -> "
            f"{c['compact_params']:,} ({100.0 * c['compact_params'] / max(1, c['params']):.1f}%)")
    if c.get("flops"):
        text += (f", FLOPs per image {_millions(c['flops'])} -> {_millions(c['compact_flops'])} "
                 f"({100.0 * c['compact_flops'] / c['flops']:.1f}%)")
    if c.get("pruned_channels_kept"):
        text += f"; {c['pruned_channels_kept']} pruned channels stay ({kept_reasons(c)})"
    lines.append(text)
    a = r["accuracy"]
    if a:
        parts = []
        for key, label in (("best_val_acc", "best val"), ("test_acc_at_best_val", "test at best val"),
                           ("final_val_acc", "final val"), ("final_test_acc", "final test"),
                           ("acc_before_s", "before removing channels"), ("acc_after_s", "after"),
                           ("checkpoint_val_acc", "this checkpoint val"),
                           ("checkpoint_test_acc", "test")):
            if key in a:
                parts.append(f"{label} {a[key]:.2f}%")
        lines.append("accuracy: " + ", ".join(parts))
    if r.get("method_values"):  # the method's own round metrics, by their declared labels
        lines.append("method: " + ", ".join(f"{label} {value:.4g}"
                                            for label, value in r["method_values"].items()))
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    p = cli.OneLineParser(prog="python -m experiments.analyze", formatter_class=cli.DocHelpFormatter,
                          description=cli.help_text(__doc__), epilog=cli.EXIT_CODES + ".")
    p.add_argument("path", metavar="CHECKPOINT_OR_DIR",
                   help="run directory, round_<r> folder, checkpoint folder or step folder")
    p.add_argument("--round", type=int, default=None,
                   help="round to open when CHECKPOINT_OR_DIR is a run directory (default: the "
                        "last one)")
    p.add_argument("--best", action="store_true",
                   help="open the round's best-validation checkpoint instead of its final ticket")
    p.add_argument("--arch", default=None,
                   help="network, when the checkpoint does not name it (default: from the "
                        "checkpoint or its run)")
    p.add_argument("--dataset", default=None,
                   help="data set, which sets the input shape for FLOPs (default: from the "
                        "checkpoint or its run)")
    p.add_argument("--input_shape", default=None, metavar="H,W,C",
                   help="one image's shape, e.g. 32,32,3 (default: from the checkpoint or the "
                        "data set)")
    p.add_argument("--approximate", action="store_true",
                   help="count pruned channels whose BatchNorm adds a constant as removed too")
    cli.add_import_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run_command(lambda: run(args), imports=args.imports)


def run(args) -> int:
    """The command, parsed: analyze and print."""
    shape = None
    if args.input_shape:
        try:
            shape = tuple(int(x) for x in args.input_shape.split(","))
            assert len(shape) == 3 and min(shape) > 0
        except (ValueError, AssertionError):
            raise cli.BadInput(f"--input_shape wants H,W,C such as 32,32,3, got "
                               f"{args.input_shape!r}") from None
    if args.dataset and args.dataset not in data_lib.IMAGE_SHAPES and shape is None:
        raise cli.BadInput(f"unknown --dataset {args.dataset!r}; choose one of "
                           f"{', '.join(data_lib.IMAGE_SHAPES)} or give --input_shape")
    result = analyze(args.path, round_idx=args.round, best=args.best, arch=args.arch,
                     dataset=args.dataset, input_shape=shape, approximate=args.approximate)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, indent=1))
    else:
        print(format_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
