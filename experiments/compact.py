"""Physically remove a ticket's pruned channels:
``python -m experiments.compact CHECKPOINT --out DIR``.

CHECKPOINT is a ``round_<r>/final`` (or ``best``) directory, one of its numbered step
directories, or a run's ``--save_dir`` (meaning its last round's final ticket); it is
opened with ``rsst_jax.tickets.load``, which reads the network (arch, classes, image
shape, options) from the checkpoint's metadata or its run. Writes ``DIR/variables/<step>/``
(orbax: the compact ``params`` and ``batch_stats``) and ``DIR/architecture.json`` (family,
per-layer widths, kept channels; ``load(DIR)`` rebuilds the network), then prints
parameters, MACs/FLOPs (one image, FLOPs = 2 x MACs) and the measured inference latency
and throughput (jit, eval mode, median of ``--runs`` timed calls after warm-up) of the
dense (the ticket's weights, masks not applied), masked and compact networks, plus how
far the compact logits are from the masked ones on test images (or random inputs when the
data set is not on disk).

Exit codes: 0 done, 2 bad input (one line on stderr: also a damaged checkpoint, named).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from rsst_jax import checkpoint as ckpt
from rsst_jax import counting, nets, tickets
from rsst_jax import data as data_lib
from rsst_jax import masks as masks_lib
from rsst_jax import train as train_lib
from rsst_jax.compact import compact, model_from_description
from rsst_jax.model_masks import masked_variables

ARCHITECTURE = "architecture.json"
VARIABLES = "variables"


# --------------------------------------------------------------------------- loading

def load_ticket(path: str):
    """(model, variables, masks, info) of a ticket checkpoint (``rsst_jax.tickets.load``);
    info = checkpoint, arch, dataset, num_classes, sample_shape, data_dir, step, options."""
    ticket = tickets.load(path, need_model=True)
    net = ticket.network
    masks = ticket.masks  # None (an initialization): nothing is pruned
    if masks is None:
        masks = jax.tree_util.tree_map(lambda _: None, ticket.params)
    info = {"checkpoint": str(ticket.path), "arch": net.arch, "dataset": net.dataset,
            "num_classes": net.num_classes, "sample_shape": list(net.image_shape),
            "data_dir": ticket.config.get("data"), "step": ticket.ref.step,
            "batch_size": ticket.config.get("batch_size"),
            "net_kwargs": net.options}
    return ticket.model, jax.tree_util.tree_map(jnp.asarray, ticket.variables), masks, info


def load(directory: str):
    """(model, variables) of a compact network written by this command."""
    d = pathlib.Path(directory)
    description = json.loads((d / ARCHITECTURE).read_text())
    model = model_from_description(description)
    template = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, *description["sample_shape"])), train=False))
    variables, _ = ckpt.restore(d / VARIABLES, template)
    return model, variables


# --------------------------------------------------------------------------- measuring

def measure_latencies(networks: dict, sample_shape, batch_sizes, runs: int, warmup: int = 2
                      ) -> dict:
    """{name: {batch size: median seconds}} of jitted eval calls ``fn(variables, x)`` for
    ``networks = {name: (fn, variables)}``. After ``warmup`` calls each (the first
    compiles), the networks are timed in turn ``runs`` times, so that a busy machine slows
    them alike."""
    out = {name: {} for name in networks}
    for bs in batch_sizes:
        x = jax.random.normal(jax.random.PRNGKey(0), (bs, *sample_shape))
        for fn, v in networks.values():
            for _ in range(max(1, warmup)):
                jax.block_until_ready(fn(v, x))
        times = {name: [] for name in networks}
        for _ in range(max(1, runs)):
            for name, (fn, v) in networks.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(v, x))
                times[name].append(time.perf_counter() - t0)
        for name, t in times.items():
            out[name][str(bs)] = statistics.median(t)
    return out


def _eval_inputs(info: dict, n: int):
    """(images, labels or None, source): test images normalized, else random normals."""
    try:
        ds = data_lib.load_dataset(info["dataset"], info.get("data_dir"))
    except Exception:
        x = jax.random.normal(jax.random.PRNGKey(1), (n, *info["sample_shape"]))
        return x, None, "random inputs"
    x = data_lib.normalize(ds.test_x[:n], ds.mean, ds.std)
    return x, ds.test_y[:n], f"{min(n, len(ds.test_y))} {info['dataset']} test images"


def fresh_statistics(model, variables, masks, info: dict, n: int) -> dict:
    """The ticket's variables (masks applied) with BatchNorm statistics re-estimated over
    n training batches of its data set (``rsst_jax.train.recalibrated``)."""
    try:
        ds = data_lib.load_dataset(info["dataset"], info.get("data_dir"))
    except data_lib.DataError as e:
        raise cli.BadInput(f"--bn_recalibrate needs the training images: {e}") from None
    try:
        return train_lib.recalibrated(model, masked_variables(variables, masks), ds, n,
                                      info.get("batch_size") or 128)
    except ValueError as e:
        raise cli.BadInput(str(e)) from None


def _fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_table(result: dict) -> str:
    sizes = [str(b) for b in result["batch_sizes"]]
    header = ["network", "params", "MACs", "FLOPs"]
    for b in sizes:
        header += [f"b={b} ms", f"b={b} img/s"]
    header += [f"speedup b={b}" for b in sizes]
    rows = [header]
    for name, net in result["networks"].items():
        row = [name, f"{net['params']:,}", _fmt_count(net["macs"]), _fmt_count(net["flops"])]
        for b in sizes:
            row += [f"{1e3 * net['latency_s'][b]:.2f}", f"{net['throughput'][b]:.0f}"]
        row += [f"{net['speedup'][b]:.2f}x" for b in sizes]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# --------------------------------------------------------------------------- command

def build_parser() -> argparse.ArgumentParser:
    ap = cli.OneLineParser(prog="python -m experiments.compact", formatter_class=cli.DocHelpFormatter,
                           description=cli.help_text(__doc__), epilog=cli.EXIT_CODES + ".")
    ap.add_argument("checkpoint",
                    help="round_<r>/final or best dir, a step dir in it, or a save_dir")
    ap.add_argument("--out", required=True, help="directory for the compact network")
    ap.add_argument("--approximate", action="store_true",
                    help="also remove pruned channels whose BatchNorm is not zeroed (reports "
                         "the error)")
    ap.add_argument("--round_to", type=int, default=1,
                    help="keep removable channels so widths are multiples of this where possible "
                         "(8 suits XLA's CPU convolutions); exactness is unaffected")
    ap.add_argument("--batch_sizes", default="1,128", help="comma-separated batch sizes to time")
    ap.add_argument("--runs", type=int, default=10, help="timed calls per measurement")
    ap.add_argument("--eval_images", type=int, default=256,
                    help="test images used to compare compact and masked logits")
    ap.add_argument("--bn_recalibrate", type=int, default=0, metavar="N",
                    help="first re-estimate the BatchNorm statistics over N training batches "
                         "(as experiments.run --bn_recalibrate; batches of the run's "
                         "--batch_size); the compact network keeps them (default: 0, off)")
    ap.add_argument("--json", action="store_true", help="print one JSON object, not a table")
    cli.add_import_flag(ap)
    return ap


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run_command(lambda: compact_command(args), imports=args.imports)


def compact_command(args) -> int:
    """The command, parsed: check the flags and --out, load, compact, measure, print."""
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError
    except ValueError:
        raise cli.BadInput(f"--batch_sizes must be positive integers like 1,128, got "
                           f"{args.batch_sizes!r}") from None
    if args.runs < 1 or args.eval_images < 1 or args.round_to < 1:
        raise cli.BadInput("--runs, --eval_images and --round_to must be at least 1")
    if args.bn_recalibrate < 0:
        raise cli.BadInput(f"--bn_recalibrate must be >= 0 batches, got {args.bn_recalibrate}")
    cli.check_out_dir(args.out)
    model, variables, masks, info = load_ticket(args.checkpoint)
    if args.bn_recalibrate:
        variables = fresh_statistics(model, variables, masks, info, args.bn_recalibrate)
    try:
        nets.get_rebuild(model)
    except ValueError as e:
        raise cli.BadInput(f"{info['checkpoint']}: {info['arch']} cannot be compacted: "
                           f"{e}") from None
    result = run(model, variables, masks, info, out=args.out, approximate=args.approximate,
                 batch_sizes=batch_sizes, runs=args.runs, eval_images=args.eval_images,
                 round_to=args.round_to)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{info['checkpoint']}: {info['arch']} on {info['dataset']}, "
          f"{info['num_classes']} classes, input {tuple(info['sample_shape'])}")
    c = result["channels"]
    print(f"prunable conv channels: {c['total']}, pruned {c['pruned']} "
          f"({100 * c['sparsity']:.2f}%), removed {c['removed']}, pruned but kept "
          f"{c['pruned_kept']}" + (f", removed only approximately {c['approximate']}"
                                   if args.approximate else ""))
    e = result["error"]
    print(f"compact vs masked on {e['inputs']}: max |logit diff| {e['max_abs']:.3g} "
          f"(relative {e['max_rel']:.3g}), top-1 agreement {100 * e['top1_agreement']:.2f}%"
          + (f", accuracy masked {e['masked_acc']:.2f}% / compact {e['compact_acc']:.2f}%"
             if e["masked_acc"] is not None else ""))
    print(format_table(result))
    print(f"wrote {result['out']}/{VARIABLES} and {result['out']}/{ARCHITECTURE}")
    return 0


def run(model, variables, masks, info, *, out, approximate=False, batch_sizes=(1, 128),
        runs=10, eval_images=256, round_to=1) -> dict:
    """Compact, write, measure; returns the JSON-able result."""
    sample_shape = tuple(info["sample_shape"])
    cmodel, cvars, desc = compact(model, variables, masks, approximate=approximate,
                                  sample_shape=sample_shape, round_to=round_to)
    desc.update(arch=info["arch"], num_classes=info["num_classes"], dataset=info["dataset"],
                source=info["checkpoint"])
    out = pathlib.Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    ckpt.save(out / VARIABLES, info["step"], cvars,
              {"arch": info["arch"], "dataset": info["dataset"], "num_classes": info["num_classes"],
               "source": info["checkpoint"], "compact": True, "exact": desc["exact"]})
    (out / ARCHITECTURE).write_text(json.dumps(desc, indent=1))

    masked = masked_variables(variables, masks)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    capply = jax.jit(lambda v, x: cmodel.apply(v, x, train=False))
    x, y, source = _eval_inputs(info, eval_images)
    a, b = np.asarray(apply(masked, x)), np.asarray(capply(cvars, x))
    diff = np.abs(a - b)
    error = {"inputs": source, "max_abs": float(diff.max()),
             "max_rel": float(diff.max() / max(np.abs(a).max(), 1e-30)),
             "top1_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))),
             "masked_acc": None if y is None else float(100 * np.mean(a.argmax(-1) == y)),
             "compact_acc": None if y is None else float(100 * np.mean(b.argmax(-1) == y))}

    channels = {"total": desc["prunable_channels"],
                "pruned": counting.count_pruned_channels(masks),
                "sparsity": masks_lib.channel_sparsity(counting.kernel_masks(masks)),
                "removed": desc["prunable_channels"] - desc["prunable_channels_kept"],
                "pruned_kept": desc["pruned_channels_kept"],
                "approximate": desc["approximate_channels"]}

    flops = counting.count_flops(model, variables, sample_shape, masks)
    cflops = counting.count_flops(cmodel, cvars, sample_shape)
    networks = {
        "dense": {"params": counting.count_params(variables["params"]), "macs": flops["macs"],
                  "flops": flops["flops"], "fn": apply, "variables": variables},
        "masked": {"params": counting.count_kept_params(variables["params"], masks),
                   "macs": flops["masked_macs"],
                   "flops": flops["masked_flops"], "fn": apply, "variables": masked},
        "compact": {"params": counting.count_params(cvars["params"]), "macs": cflops["macs"],
                    "flops": cflops["flops"], "fn": capply, "variables": cvars},
    }
    latencies = measure_latencies({name: (net.pop("fn"), net.pop("variables"))
                                   for name, net in networks.items()},
                                  sample_shape, batch_sizes, runs)
    for name, net in networks.items():
        net["latency_s"] = latencies[name]
        net["throughput"] = {k: int(k) / s for k, s in net["latency_s"].items()}
    for net in networks.values():
        net["speedup"] = {k: networks["dense"]["latency_s"][k] / s
                          for k, s in net["latency_s"].items()}
    return {"checkpoint": info["checkpoint"], "arch": info["arch"], "dataset": info["dataset"],
            "num_classes": info["num_classes"], "sample_shape": list(sample_shape),
            "out": str(out), "approximate": bool(approximate), "exact": desc["exact"],
            "round_to": int(round_to),
            "batch_sizes": list(batch_sizes), "channels": channels, "error": error,
            "networks": networks, "platform": jax.devices()[0].platform,
            "note": "MACs per image of convs and dense layers; FLOPs = 2 x MACs; masked "
                    "MACs count kept weights only (no dense kernel realises them)"}


if __name__ == "__main__":
    sys.exit(main())
