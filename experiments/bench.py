"""Throughput of training: ``python -m experiments.bench --arch res20s --batch_size 128``.

Measures, on generated uint8 images of ``--image_shape`` held on the device:

- **steps**: compile time of the dense and the masked steps (one per transformation a
  method adds: IMP and Refill share ``masked``, RSST's penalty makes ``rsst``); median
  step time and images/s of ``dense`` (a plain optimizer: no masks, no penalty) and of
  each registered method under its title in lower case (``example_masks``: random 50%
  weight masks and half the channels of each layer): ``imp`` (the weight masks),
  ``refill`` (the channels) and ``rsst`` (weight masks + penalty targets, lambda > 0),
  with ratios to dense. The variants run interleaved so machine load hits them
  alike;
- **epochs**: whole epochs of ``--train_size`` images through the machinery of
  ``experiments.run`` (``rsst_jax.engine.Engine``: the in-step gather and augmentation,
  fused chunks of the run's length with the remainder chunk, evaluation apart), fused
  chunks against the step loop, and which of the two ``--fused auto`` takes;
- **tickets** (``--num_seeds 1,4,8``): K RSST tickets trained as one program: epoch
  images/s of all K together, the devices they were spread over (every visible one
  that divides K evenly; ``--ticket_devices 1,2`` times each count in turn), and XLA's
  memory estimate of the program;
- eval images/s, peak device memory where JAX reports it, and the device.

``--epoch_table`` times only epochs, fused against the step loop, over every
combination of the comma-separated ``--arch``, ``--batch_size`` and ``--image_shape``
(shapes separated by ``:``): the table behind ``--fused auto`` in docs/performance.md.
``--json`` prints one JSON object instead of the table. Exit 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from experiments.cli import BadInput, HelpFormatter, add_import_flag, one_line_parse
from rsst_jax import config as config_lib
from rsst_jax import counting, methods, nets, parallel, rounds, trees
from rsst_jax import data as data_lib
from rsst_jax import engine as engine_lib
from rsst_jax import masks as masks_lib
from rsst_jax import train as train_lib
from rsst_jax.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.bench", formatter_class=HelpFormatter,
                                allow_abbrev=False,
                                description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="res20s", help="network(s), comma-separated with "
                   "--epoch_table (see rsst_jax.nets.available_nets())")
    p.add_argument("--batch_size", default="128", help="training batch size (comma-separated "
                   "with --epoch_table)")
    p.add_argument("--image_shape", default="32,32,3", help="H,W,C of the generated images "
                   "(several separated by ':' with --epoch_table, e.g. 32,32,1:32,32,3)")
    p.add_argument("--num_classes", type=int, default=10, help="classes of the generated labels")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="compute precision, as experiments.run --precision")
    p.add_argument("--accum_steps", type=int, default=1, help="gradient accumulation "
                   "micro-batches per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant after "
                   "compiling")
    p.add_argument("--variants", default="dense,imp,refill,rsst", help="step variants to time: "
                   "dense and the registered methods' titles in lower case (empty: none)")
    p.add_argument("--train_size", type=int, default=1257, help="training images of the "
                   "generated data set the epochs run over (1257: digits' size)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per fused setting, "
                   "the settings taking turns (after one untimed epoch that compiles; 0: "
                   "skip the epoch timing)")
    p.add_argument("--fused_steps", type=int, default=None, help="steps per fused chunk (when "
                   "not given: what a run uses, 8 on CPU, --print_freq 50 on accelerators)")
    p.add_argument("--struct", default="rsst", help="method of the timed epochs and tickets "
                   "(experiments.run's --struct; its rounds after 0, with random 50%% weight "
                   "masks and half the channels: example_masks)")
    add_import_flag(p)
    p.add_argument("--epoch_table", action="store_true", help="time only epochs, fused against "
                   "the step loop, for every --arch x --image_shape x --batch_size")
    p.add_argument("--eval_batch_size", type=int, default=500, help="evaluation batch size")
    p.add_argument("--eval_reps", type=int, default=3, help="timed evaluation batches")
    p.add_argument("--num_seeds", default="", help="comma-separated K: time epochs of K RSST "
                   "tickets trained as one program (e.g. 1,4,8)")
    p.add_argument("--ticket_devices", default="", help="comma-separated device counts the "
                   "--num_seeds tickets may be spread over, each timed in turn (e.g. 1,2; when "
                   "not given: every visible device)")
    p.add_argument("--cpu_devices", type=int, default=None,
                   help="split the host CPU into this many XLA devices, data parallel "
                        "(when not given: $RSST_JAX_CPU_DEVICES, else 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data and weights")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


class BenchError(BadInput):
    """Bad bench input; the message says what to change."""


def _ints(text: str, flag: str) -> list[int]:
    try:
        out = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise BenchError(f"{flag} wants comma-separated integers, got {text!r}") from None
    if not out or any(v < 1 for v in out):
        raise BenchError(f"{flag} wants positive integers, got {text!r}")
    return out


def _shapes(text: str) -> list[tuple[int, int, int]]:
    out = []
    for part in str(text).split(":"):
        try:
            shape = tuple(int(v) for v in part.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise BenchError(f"--image_shape wants H,W,C such as 32,32,3, got {part!r}")
        out.append(shape)
    return out


def parse_args(argv=None):
    """Parsed and checked arguments: lists in ``archs``, ``batch_sizes``, ``shapes``,
    ``seed_counts``; BenchError (one line) on bad input."""
    try:
        args = one_line_parse(build_parser(), argv, "python -m experiments.bench")
    except ConfigError as e:
        raise BenchError(str(e)) from None
    try:
        methods.get_method(args.struct)  # the message names the registered ones
    except ValueError as e:
        raise BenchError(str(e)) from None
    args.archs = [a for a in args.arch.split(",") if a]
    for a in args.archs:
        if a not in nets.available_nets():
            raise BenchError(f"unknown --arch {a!r}; choose one of: "
                             f"{', '.join(nets.available_nets())}")
    args.batch_sizes = _ints(args.batch_size, "--batch_size")
    args.shapes = _shapes(args.image_shape)
    args.seed_counts = _ints(args.num_seeds, "--num_seeds") if args.num_seeds else []
    args.device_counts = (_ints(args.ticket_devices, "--ticket_devices")
                          if args.ticket_devices else [None])
    if args.ticket_devices and not args.seed_counts:
        raise BenchError("--ticket_devices spreads the tickets of --num_seeds; give --num_seeds")
    for flag in ("steps", "train_size", "eval_batch_size", "eval_reps", "accum_steps",
                 "num_classes"):
        if getattr(args, flag) < 1:
            raise BenchError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("warmup", "epochs"):
        if getattr(args, flag) < 0:
            raise BenchError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.fused_steps is not None and args.fused_steps < 1:
        raise BenchError(f"--fused_steps must be >= 1, got {args.fused_steps}")
    if not args.epoch_table and (len(args.archs), len(args.batch_sizes), len(args.shapes)) != (1, 1, 1):
        raise BenchError("several --arch, --batch_size or --image_shape values need --epoch_table")
    for bs in args.batch_sizes:
        if bs % args.accum_steps:
            raise BenchError(f"--batch_size {bs} must be a multiple of --accum_steps "
                             f"{args.accum_steps}")
        if bs > args.train_size:
            raise BenchError(f"--batch_size {bs} is larger than --train_size {args.train_size}")
    known = ["dense", *method_variants()]
    unknown = set(v for v in args.variants.split(",") if v) - set(known)
    if unknown:
        raise BenchError(f"unknown --variants {sorted(unknown)}; choose from "
                         f"{', '.join(known)}")
    return args


def method_variants() -> dict:
    """Step variant name (a method's title in lower case) -> the registered method."""
    return {(m.title or m.name).lower(): m for m in methods.registered()}


def _median_ms(times):
    return 1e3 * statistics.median(times)


def generated_dataset(shape, n_train: int, num_classes: int, seed: int, n_eval: int = 270):
    """Random uint8 images and labels with the splits of a real data set."""
    rng = np.random.default_rng(seed)

    def split(n):
        return (rng.integers(0, 256, (n, *shape), dtype=np.uint8),
                rng.integers(0, num_classes, (n,)).astype(np.int32))
    (tx, ty), (vx, vy), (ex, ey) = split(n_train), split(n_eval), split(n_eval)
    return data_lib.Dataset("generated", tx, ty, vx, vy, ex, ey, num_classes=num_classes,
                            mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1], flip=True)


def bench_config(args, arch: str, batch_size: int, **overrides):
    """The configuration a bench engine runs: a round of 120 epochs of ``--struct`` (RSST's
    lambda grows from its first step)."""
    values = dict(arch=arch, batch_size=batch_size, precision=args.precision,
                  accum_steps=args.accum_steps, struct=args.struct, epochs=120, warmup=1,
                  RST_schedule="x", reg_granularity_prune=1e-3, update_reg_interval=1,
                  eval_batch_size=args.eval_batch_size, fused_steps=args.fused_steps,
                  save_dir="unused", seed=args.seed)
    values.update(overrides)
    return config_lib.validate(config_lib.Config.from_dict(values))


def example_masks(method, cfg, weight, channel) -> tuple:
    """(M, S) of a typical round of ``method`` after round 0, from a weight mask and a
    channel mask: a method with a penalty trains the weight mask and ends by applying the
    channel mask (RSST), one that keeps whole channels trains the channel mask (Refill),
    another the weight mask (IMP). Step time depends on what the step computes, not on
    the masks' contents, so this stands for any method's round."""
    if method.penalty(cfg) is not None:
        return weight, channel
    return (channel if method.channels else weight), None


def _epoch_state(engine, cfgs):
    """Stacked states and plans of the method's typical round (``example_masks`` of
    random 50% weight masks and half the channels)."""
    states, plans = [], []
    for k, cfg in enumerate(cfgs):
        state = engine.fresh_state(cfg.run.resolved_seed + k)
        full = rounds.initial_masks(engine.net, state.params, cfg.prune)
        key = jax.random.PRNGKey(cfg.run.resolved_seed + k)
        weight = masks_lib.random_prune(jax.random.fold_in(key, 1), full, 0.5)
        plan = engine.plan(cfg, *example_masks(engine.method, cfg, weight,
                                               half_channels(full, key)))
        states.append(state.replace(params=masks_lib.apply_masks(state.params, plan.step.masks)))
        plans.append(plan.step)
    return trees.stack(states), trees.stack(plans)


def half_channels(masks, key):
    leaves, treedef = jax.tree_util.tree_flatten(masks, is_leaf=lambda x: x is None)
    out = []
    for i, m in enumerate(leaves):
        if m is None:
            out.append(None)
            continue
        keep = jax.random.bernoulli(jax.random.fold_in(key, 100 + i), 0.5, (m.shape[-1],))
        out.append(jnp.broadcast_to(keep, m.shape))
    return jax.tree_util.tree_unflatten(treedef, out)


def time_epochs(args, arch, batch_size, shape, setups, ds=None, memory: bool = False) -> dict:
    """Seconds per epoch on the run's engine for each setup ``(label, --fused setting,
    tickets[, devices])``: one untimed epoch each (it compiles), then ``--epochs`` timed
    rounds in which the setups take turns (machine load hits them alike); the median per
    setup. ``devices``: how many of the visible devices the engine may use (None: all).
    ``memory``: also XLA's memory estimate of each train program (compiles it again)."""
    ds = ds or generated_dataset(shape, args.train_size, args.num_classes, args.seed)
    ready = {}
    for label, mode, num_seeds, *devices in setups:
        cfgs = [bench_config(args, arch, batch_size, fused=mode, seed=args.seed + k)
                for k in range(num_seeds)]
        n_dev = devices[0] if devices else None
        eng = engine_lib.Engine(cfgs, dataset=ds,
                                devices=None if n_dev is None else jax.devices()[:n_dev])
        states, plan = _epoch_state(eng, cfgs)
        seeds = [c.run.resolved_seed for c in cfgs]
        t0 = time.perf_counter()
        states, m = eng.train_epoch(states, plan, engine_lib.epoch_perms(eng, seeds, 0, 0))
        jax.block_until_ready(states)
        if not m["finite"].all():
            raise BenchError(f"{arch}: the loss became non-finite on the generated data; "
                             f"lower --batch_size or check --precision")
        ready[label] = [eng, states, plan, seeds, time.perf_counter() - t0, []]
    for e in range(max(1, args.epochs)):
        for label in ready:
            eng, states, plan, seeds, _, times = ready[label]
            t0 = time.perf_counter()
            states, _ = eng.train_epoch(states, plan, engine_lib.epoch_perms(eng, seeds, 0, e + 1))
            jax.block_until_ready(states)
            times.append(time.perf_counter() - t0)
            ready[label][1] = states
    out = {}
    for label, (eng, states, plan, seeds, first, times) in ready.items():
        out[label] = {"fused": eng.fused, "fused_steps": eng.fused_steps,
                      "steps": eng.steps_per_epoch, "num_seeds": len(seeds),
                      "ticket_devices": eng.ticket_devices,
                      "first_epoch_s": round(first, 2),
                      "epoch_s": round(statistics.median(times), 3),
                      "memory_mb": _program_memory(eng, states, plan, seeds) if memory else None}
    return out


def _program_memory(eng, states, plan, seeds):
    """XLA's estimate of the train program's memory (arguments + outputs + temporaries)."""
    perms = engine_lib.epoch_perms(eng, seeds, 0, 0)
    prog = eng.train_chunk if eng.fused else eng.train_step
    idx = perms[:, :min(eng.fused_steps, perms.shape[1])] if eng.fused else perms[:, 0]
    try:
        a = prog.lower(states, eng.dev["train_x"], eng.dev["train_y"],
                       parallel.shard_batch(np.asarray(idx), eng.mesh, idx.ndim - 1),
                       plan).compile().memory_analysis()
        total = a.argument_size_in_bytes + a.output_size_in_bytes + a.temp_size_in_bytes
        return round(total / 2 ** 20, 1)
    except Exception:  # not every backend reports it
        return None


def epoch_table(args) -> list[dict]:
    """Seconds per epoch, fused against the step loop, and auto's choice, per combination."""
    rows = []
    for arch in args.archs:
        for shape in args.shapes:
            ds = generated_dataset(shape, args.train_size, args.num_classes, args.seed)
            for bs in args.batch_sizes:
                t = time_epochs(args, arch, bs, shape, [("off", "off", 1), ("on", "on", 1)], ds)
                off, on = t["off"], t["on"]
                auto = engine_lib.Engine([bench_config(args, arch, bs, fused="auto")],
                                         dataset=ds).fused
                best = min(off["epoch_s"], on["epoch_s"])
                chosen = on["epoch_s"] if auto else off["epoch_s"]
                rows.append({"arch": arch, "image_shape": list(shape), "batch_size": bs,
                             "steps": on["steps"], "fused_steps": on["fused_steps"],
                             "off_s": off["epoch_s"], "on_s": on["epoch_s"],
                             "speedup": round(off["epoch_s"] / on["epoch_s"], 3),
                             "auto": "on" if auto else "off",
                             "auto_vs_best": round(chosen / best, 3)})
    return rows


def run(args) -> dict:
    result = {"device": str(jax.devices()[0]), "platform": jax.default_backend(),
              "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
              "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "host": platform.node(), "cpu_count": os.cpu_count(), "loadavg": _loadavg(),
              "precision": args.precision, "train_size": args.train_size}
    if args.epoch_table:
        result["epoch_table"] = epoch_table(args)
        return result
    arch, bs, shape = args.archs[0], args.batch_sizes[0], args.shapes[0]
    mesh = parallel.data_mesh(batch_size=bs // args.accum_steps)
    result.update(arch=arch, batch_size=bs, image_shape=list(shape),
                  num_classes=args.num_classes, accum_steps=args.accum_steps,
                  mesh_devices=1 if mesh is None else mesh.size)
    names = [v for v in args.variants.split(",") if v]
    if names:
        result.update(bench_steps(args, arch, bs, shape, mesh, names))
    ds = generated_dataset(shape, args.train_size, args.num_classes, args.seed)
    if args.epochs:
        t = time_epochs(args, arch, bs, shape, [("off", "off", 1), ("on", "on", 1)], ds)
        off, on = t["off"], t["on"]
        auto = engine_lib.Engine([bench_config(args, arch, bs, fused="auto")], dataset=ds).fused
        result["epochs"] = {"off": off, "on": on, "speedup": round(off["epoch_s"] / on["epoch_s"], 3),
                            "auto": "on" if auto else "off"}
    if args.seed_counts:
        if any(n is not None and n > jax.device_count() for n in args.device_counts):
            raise BenchError(f"--ticket_devices {args.ticket_devices}: only "
                             f"{jax.device_count()} device(s) visible (on CPU: --cpu_devices N)")
        result["tickets"] = []
        setups = [(f"K={k},devices={n}", "auto", k, n)
                  for k in args.seed_counts for n in args.device_counts]
        timed = time_epochs(args, arch, bs, shape, setups, ds, memory=True)
        for label, _, k, _ in setups:
            t = timed[label]
            t["images_per_s"] = round(k * t["steps"] * bs / t["epoch_s"], 1)
            result["tickets"].append(t)
    result["eval"] = bench_eval(args, arch, shape, mesh)
    stats = jax.devices()[0].memory_stats()
    result["peak_memory_mb"] = (round(stats["peak_bytes_in_use"] / 2**20, 1)
                                if stats and "peak_bytes_in_use" in stats else None)
    return result


def bench_steps(args, arch, bs, shape, mesh, names) -> dict:
    """Interleaved single steps of the dense, IMP, Refill and RSST variants."""
    cfg = bench_config(args, arch, bs)
    model = engine_lib.build_model(cfg.model, args.num_classes)
    rng = np.random.default_rng(args.seed)
    n_train = bs * 4
    data_x = rng.integers(0, 256, (n_train, *shape), dtype=np.uint8)
    data_y = rng.integers(0, args.num_classes, (n_train,)).astype(np.int32)
    data_x, data_y = parallel.replicate((jax.device_put(data_x), jax.device_put(data_y)), mesh)
    step_cfg = train_lib.StepConfig(flip=True, mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1],
                                    accum_steps=args.accum_steps)
    schedules = train_lib.Schedules(350, 120 * 350, 1, (91, 136))
    opt = dict(optimizer="sgd", momentum=0.9, weight_decay=1e-4)
    key = jax.random.PRNGKey(args.seed)
    tx = {"dense": train_lib.make_optimizer(**opt, masked=False)}
    base = train_lib.create_train_state(model, tx["dense"], key, shape)
    full = masks_lib.init_masks(base.params)
    weight = masks_lib.random_prune(jax.random.fold_in(key, 1), full, 0.5)
    channel = half_channels(full, key)
    variants = {"dense": ("dense", None, None, train_lib.Hyper.make(0.01))}
    schedule = {"dense": None, "masked": None}  # the lambda schedule of each program
    for name, method in method_variants().items():
        if name not in names:
            continue
        m_cfg = cfg.replace(struct=method.name, mask_bn=False)  # the masks as given
        penalty = method.penalty(m_cfg)
        prog = "masked" if penalty is None else name
        tx.setdefault(prog, train_lib.make_optimizer(
            **opt, penalty=None if penalty is None else penalty.transform))
        schedule.setdefault(prog, None if penalty is None else penalty.schedule)
        m, s_ = example_masks(method, m_cfg, weight, channel)
        t = method.targets(m_cfg, rounds.Network(model, shape), m, s_)
        variants[name] = (prog, m, rounds.no_targets(full) if t is None else t,
                          train_lib.Hyper.make(0.01, None if penalty is None else penalty.values))
    sharding = None if mesh is None else parallel.batch_sharding(mesh)
    programs, compile_s, states, plans = {}, {}, {}, {}
    idx = parallel.shard_batch(np.arange(bs, dtype=np.int32)[None], mesh, 1)
    for name in names:
        prog, m, t, hyper = variants[name]
        params = base.params if m is None else masks_lib.apply_masks(base.params, m)
        states[name] = parallel.replicate(trees.stack([train_lib.TrainState(
            step=base.step, params=params, batch_stats=base.batch_stats,
            opt_state=tx[prog].init(params), rng=base.rng)]), mesh)
        plans[name] = parallel.replicate(trees.stack([train_lib.Plan(
            masks=m, targets=t, reg_scale=jnp.float32(1.0), hyper=hyper)]), mesh)
        if prog not in programs:
            step = train_lib.gather_step(train_lib.make_train_step(
                model, tx[prog], step_cfg, schedules, batch_sharding=sharding,
                lambda_schedule=schedule[prog]))
            jitted = parallel.jit_train(train_lib.over_tickets(step, 1), mesh, batch_axis=1)
            t0 = time.perf_counter()
            programs[prog] = jitted.lower(states[name], data_x, data_y, idx,
                                          plans[name]).compile()
            compile_s[prog] = time.perf_counter() - t0
    perms = [parallel.shard_batch(rng.permutation(n_train)[:bs].astype(np.int32)[None], mesh, 1)
             for _ in range(4)]

    def one_step(name, i):
        prog = programs[variants[name][0]]
        t0 = time.perf_counter()
        states[name], metrics = prog(states[name], data_x, data_y, perms[i % 4], plans[name])
        jax.block_until_ready((states[name], metrics))
        return time.perf_counter() - t0, metrics

    for i in range(args.warmup):
        for name in names:
            one_step(name, i)
    times = {name: [] for name in names}
    for i in range(args.steps):
        for name in names:
            dt, metrics = one_step(name, i)
            times[name].append(dt)
            if not bool(np.asarray(metrics["finite"]).all()):
                raise BenchError(f"{name}: the loss became non-finite at timed step {i}; lower "
                                 f"--batch_size or check --precision")
    out = {"compile_s": {k: round(v, 2) for k, v in compile_s.items()}, "steps": args.steps,
           "step_ms": {}, "images_per_s": {}, "ratio_to_dense": {}}
    for name in names:
        out["step_ms"][name] = round(_median_ms(times[name]), 2)
        out["images_per_s"][name] = round(bs / out["step_ms"][name] * 1e3, 1)
    if "dense" in names:
        for name in names:
            out["ratio_to_dense"][name] = round(out["step_ms"][name] / out["step_ms"]["dense"], 3)
    n_dev = 1 if mesh is None else mesh.size  # XLA counts one device's share of the program
    flops = {p: None if counting.xla_flops(c) is None else counting.xla_flops(c) * n_dev
             for p, c in programs.items()}
    out["gflop_per_step"] = {k: None if v is None else float(f"{v / 1e9:.4g}")
                             for k, v in flops.items()}
    out["achieved_tflop_s"] = {
        name: None if flops[variants[name][0]] is None else
        round(flops[variants[name][0]] / (out["step_ms"][name] / 1e3) / 1e12, 4)
        for name in names}
    return out


def bench_eval(args, arch, shape, mesh) -> dict:
    cfg = bench_config(args, arch, args.batch_sizes[0])
    model = engine_lib.build_model(cfg.model, args.num_classes)
    ebs = args.eval_batch_size
    step_cfg = train_lib.StepConfig(flip=True, mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1])
    eval_step = parallel.jit_eval(train_lib.make_eval_step(model, step_cfg), mesh, ebs)
    variables = model.init(jax.random.PRNGKey(args.seed), np.zeros((1, *shape), np.float32),
                           train=False)
    rng = np.random.default_rng(args.seed + 1)
    x = jax.device_put(rng.integers(0, 256, (ebs, *shape), dtype=np.uint8))
    y = jax.device_put(rng.integers(0, args.num_classes, (ebs,)).astype(np.int32))
    valid = jax.device_put(np.ones((ebs,), bool))
    jax.block_until_ready(eval_step(variables, x, y, valid))
    times = []
    for _ in range(args.eval_reps):
        t0 = time.perf_counter()
        jax.block_until_ready(eval_step(variables, x, y, valid))
        times.append(time.perf_counter() - t0)
    ms = _median_ms(times)
    return {"batch_size": ebs, "batch_ms": round(ms, 2), "images_per_s": round(ebs / ms * 1e3, 1)}


def _loadavg():
    try:
        return [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


def format_table(r: dict) -> str:
    lines = [f"device {r['device']} ({r['platform']}, {r['device_count']} device(s)), jax "
             f"{r['jax']}, load average {r['loadavg']}"]
    if "epoch_table" in r:
        lines.append(f"seconds per epoch of {r['train_size']} generated images, {r['precision']}"
                     f" (fused chunks against the step loop; auto: what --fused auto runs)")
        lines.append(f"{'arch':<10}{'images':>10}{'batch':>7}{'steps':>7}{'off s':>9}"
                     f"{'fused s':>9}{'speedup':>9}{'auto':>6}{'auto/best':>10}")
        for row in r["epoch_table"]:
            lines.append(f"{row['arch']:<10}{'x'.join(map(str, row['image_shape'])):>10}"
                         f"{row['batch_size']:>7}{row['steps']:>7}{row['off_s']:>9.2f}"
                         f"{row['on_s']:>9.2f}{row['speedup']:>9.3f}{row['auto']:>6}"
                         f"{row['auto_vs_best']:>10.3f}")
        return "\n".join(lines)
    lines.append(f"{r['arch']} batch {r['batch_size']} (split over {r['mesh_devices']} "
                 f"device(s)) images {tuple(r['image_shape'])} {r['num_classes']} classes, "
                 f"{r['precision']}"
                 + (f", accum_steps {r['accum_steps']}" if r["accum_steps"] > 1 else ""))
    if "step_ms" in r:
        lines.append("compile: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["compile_s"].items()))
        lines.append(f"{'step':<8}{'ms/step':>10}{'images/s':>11}{'vs dense':>10}")
        for name, ms in r["step_ms"].items():
            ratio = r["ratio_to_dense"].get(name)
            lines.append(f"{name:<8}{ms:>10.1f}{r['images_per_s'][name]:>11.1f}"
                         f"{'' if ratio is None else f'{ratio:.3f}':>10}")
        gf = r.get("gflop_per_step", {})
        if any(v is not None for v in gf.values()):
            lines.append("XLA flop count per step: " + ", ".join(
                f"{k} {v} GFLOP" for k, v in gf.items()) + "; achieved " + ", ".join(
                f"{k} {v} TFLOP/s" for k, v in r["achieved_tflop_s"].items() if v is not None))
    if "epochs" in r:
        e = r["epochs"]
        lines.append(f"epoch of {r['train_size']} images ({e['on']['steps']} steps, rsst): step "
                     f"loop {e['off']['epoch_s']:.2f} s, fused chunks of "
                     f"{e['on']['fused_steps']} {e['on']['epoch_s']:.2f} s: speedup "
                     f"{e['speedup']:.3f}x; --fused auto runs {e['auto']}")
    for row in r.get("tickets", []):
        mem = "" if row.get("memory_mb") is None else f", program memory {row['memory_mb']} MiB"
        n = row.get("ticket_devices", 1)
        lines.append(f"rsst x {row['num_seeds']} tickets as one program on {n} device"
                     f"{'s' if n != 1 else ''}: {row['epoch_s']:.2f} s per epoch, "
                     f"{row['images_per_s']:.1f} images/s in all{mem}")
    e = r["eval"]
    lines.append(f"eval batch {e['batch_size']}: {e['batch_ms']:.1f} ms, "
                 f"{e['images_per_s']:.1f} images/s")
    lines.append(f"peak device memory: {r['peak_memory_mb']} MiB" if r["peak_memory_mb"]
                 is not None else "peak device memory: not reported by this backend")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 bad input (one line on stderr)."""

    def body():
        cli.import_modules(cli.imports_of(sys.argv[1:] if argv is None else argv))
        try:
            args = parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        parallel.split_cpu(args.cpu_devices)  # before any JAX operation
        result = run(args)
        print(json.dumps(result) if args.json else format_table(result))
        return 0

    return cli.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
