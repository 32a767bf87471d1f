"""Throughput of the train steps: ``python -m experiments.bench --arch res20s --batch_size 128``.

Measures, on random uint8 images of ``--image_shape`` held on the device:
- compile time of the dense step and of the masked step (IMP, Refill and RSST share it);
- steady-state step time (median over ``--steps`` steps after ``--warmup``) and images/s
  for: ``dense`` (a plain optimizer chain: no masks, no penalty), ``imp`` (random 50%
  weight masks), ``refill`` (channel masks, half the channels of each layer) and
  ``rsst`` (weight masks + penalty targets, lambda > 0), with ratios to dense. The
  variants run interleaved (one step of each in turn) so machine load hits them alike;
- the fused chunk (``--fused_steps k`` steps as one ``lax.scan``, unrolled on CPU, a loop
  on accelerators, or as ``--fused_form`` says) against k single steps;
- eval images/s, peak device memory where JAX reports it, and the device.
``--json`` prints one JSON object instead of the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.bench",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="res20s")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--image_shape", default="32,32,3", help="H,W,C")
    p.add_argument("--num_classes", type=int, default=10)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--accum_steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant after compiling")
    p.add_argument("--fused_steps", type=int, default=5,
                   help="steps per fused chunk to compare with the step loop (0: skip)")
    p.add_argument("--fused_reps", type=int, default=3, help="timed chunks (and step loops)")
    p.add_argument("--fused_form", choices=("auto", "unrolled", "loop"), default="auto",
                   help="the chunk as straight-line code or as a loop (auto: as a run does, "
                        "unrolled on CPU, a loop on accelerators)")
    p.add_argument("--eval_batch_size", type=int, default=500)
    p.add_argument("--eval_reps", type=int, default=3)
    p.add_argument("--variants", default="dense,imp,refill,rsst")
    p.add_argument("--num_seeds", default="",
                   help="comma-separated K: time the RSST step vmapped over K tickets (e.g. 1,4,8)")
    p.add_argument("--seed_steps", type=int, default=3, help="timed steps per K")
    p.add_argument("--cpu_devices", type=int, default=None,
                   help="split the host CPU into this many XLA devices, data parallel "
                        "(default: $RSST_JAX_CPU_DEVICES, else 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def _median_ms(times):
    return 1e3 * statistics.median(times)


def run(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rsst_jax import counting
    from rsst_jax import masks as masks_lib
    from rsst_jax import nets, parallel, regularizers
    from rsst_jax import train as train_lib

    shape = tuple(int(s) for s in args.image_shape.split(","))
    bs = args.batch_size
    # As in a run: the batch split over all devices (CPU: the devices split_cpu made).
    mesh = parallel.data_mesh(batch_size=bs // args.accum_steps)
    batch_sh = None if mesh is None else parallel.batch_sharding(mesh)
    dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
    model = nets.get_net(args.arch, args.num_classes, dtype=dtype)
    rng = np.random.default_rng(args.seed)
    n_train = bs * max(4, args.fused_steps)
    data_x = jax.device_put(rng.integers(0, 256, (n_train, *shape), dtype=np.uint8))
    data_y = jax.device_put(rng.integers(0, args.num_classes, (n_train,)).astype(np.int32))
    data_x, data_y = parallel.replicate((data_x, data_y), mesh)
    cfg = train_lib.StepConfig(flip=True, mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1],
                               accum_steps=args.accum_steps)
    steps_per_epoch = 350
    lr = train_lib.lr_schedule(0.01, steps_per_epoch, 1, (91, 136))
    # Penalty schedule of a 120-epoch round; the bench runs at its start, lambda > 0 anyway.
    reg = regularizers.lambda_schedule("x", total_steps=120 * steps_per_epoch,
                                       steps_per_epoch=steps_per_epoch, update_interval=1,
                                       granularity=1e-3)
    opt = dict(optimizer="sgd", lr=lr, momentum=0.9, weight_decay=1e-4)
    tx_dense = train_lib.make_optimizer(**opt, masked=False)
    tx_masked = train_lib.make_optimizer(**opt, reg_schedule=reg)

    key = jax.random.PRNGKey(args.seed)
    base = train_lib.create_train_state(model, tx_masked, key, shape)
    full = masks_lib.init_masks(base.params)
    weight_masks = masks_lib.random_prune(jax.random.fold_in(key, 1), full, 0.5)

    def half_channels(m, k):
        keep = jax.random.bernoulli(k, 0.5, (m.shape[-1],))
        return jnp.broadcast_to(keep, m.shape)
    leaves, treedef = jax.tree_util.tree_flatten(full, is_leaf=lambda x: x is None)
    channel_masks = jax.tree_util.tree_unflatten(treedef, [
        None if m is None else half_channels(m, jax.random.fold_in(key, 100 + i))
        for i, m in enumerate(leaves)])
    no_targets = jax.tree_util.tree_map(lambda m: None if m is None else jnp.zeros_like(m),
                                        full, is_leaf=lambda x: x is None)
    variants = {  # name -> (optimizer, masks, targets)
        "dense": (tx_dense, None, None),
        "imp": (tx_masked, weight_masks, no_targets),
        "refill": (tx_masked, channel_masks, no_targets),
        "rsst": (tx_masked, weight_masks, masks_lib.rsst_targets(weight_masks, channel_masks)),
    }
    names = [v for v in args.variants.split(",") if v]
    unknown = set(names) - set(variants)
    if unknown:
        raise SystemExit(f"unknown --variants {sorted(unknown)}; choose from {list(variants)}")

    scale = jnp.float32(1.0)
    compiled, compile_s, states = {}, {}, {}
    for name in names:
        tx, m, t = variants[name]
        params = base.params if m is None else masks_lib.apply_masks(base.params, m)
        # Own buffers per variant: each step donates its state.
        states[name] = parallel.replicate(jax.tree_util.tree_map(jnp.copy, train_lib.TrainState(
            step=base.step, params=params, batch_stats=base.batch_stats,
            opt_state=tx.init(params), rng=base.rng)), mesh)
        variants[name] = (tx, *parallel.replicate((m, t), mesh))
        m, t = variants[name][1:]
        prog = "dense" if tx is tx_dense else "masked"
        if prog not in compiled:
            step = parallel.jit_step(train_lib.make_train_step(model, tx, cfg,
                                                               batch_sharding=batch_sh), mesh)
            t0 = time.perf_counter()
            idx = parallel.shard_batch(np.arange(bs, dtype=np.int32), mesh)
            compiled[prog] = step.lower(states[name], data_x, data_y, idx, m, t, scale).compile()
            compile_s[prog] = time.perf_counter() - t0

    perm = [parallel.shard_batch(np.asarray(jax.random.permutation(
        jax.random.fold_in(key, 7 + i), n_train)[:bs]).astype(np.int32), mesh) for i in range(4)]

    def one_step(name, i):
        tx, m, t = variants[name]
        prog = compiled["dense" if tx is tx_dense else "masked"]
        t0 = time.perf_counter()
        states[name], metrics = prog(states[name], data_x, data_y, perm[i % 4], m, t, scale)
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
            if not bool(metrics["finite"]):
                raise SystemExit(f"{name}: non-finite loss at timed step {i}")

    result = {
        "arch": args.arch, "batch_size": bs, "image_shape": list(shape),
        "num_classes": args.num_classes, "precision": args.precision,
        "accum_steps": args.accum_steps, "steps": args.steps,
        "device": str(jax.devices()[0]), "platform": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
        "mesh_devices": 1 if mesh is None else mesh.size,
        "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "host": platform.node(), "cpu_count": os.cpu_count(),
        "loadavg": _loadavg(),
        "compile_s": {k: round(v, 2) for k, v in compile_s.items()},
        "step_ms": {}, "images_per_s": {}, "ratio_to_dense": {},
    }
    for name in names:
        ms = _median_ms(times[name])
        result["step_ms"][name] = round(ms, 2)
        result["images_per_s"][name] = round(bs / ms * 1e3, 1)
    if "dense" in names:
        for name in names:
            result["ratio_to_dense"][name] = round(result["step_ms"][name]
                                                   / result["step_ms"]["dense"], 3)

    n_dev = 1 if mesh is None else mesh.size  # XLA counts one device's share of the program
    flops = {prog: None if counting.xla_flops(c) is None else counting.xla_flops(c) * n_dev
             for prog, c in compiled.items()}
    result["gflop_per_step"] = {k: None if v is None else float(f"{v / 1e9:.4g}")
                                for k, v in flops.items()}
    result["achieved_tflop_s"] = {
        name: (None if flops["dense" if variants[name][0] is tx_dense else "masked"] is None else
               round(flops["dense" if variants[name][0] is tx_dense else "masked"]
                     / (result["step_ms"][name] / 1e3) / 1e12, 4)) for name in names}
    if args.fused_steps > 0:
        result["fused"] = _bench_fused(args, model, variants, compiled, states, cfg, data_x,
                                       data_y, n_train, key, mesh)
    if args.num_seeds:
        result["seeds"] = _bench_seeds(args, model, variants, cfg, data_x, data_y, n_train, key,
                                       shape)
    result["eval"] = _bench_eval(args, model, cfg, states, names, shape, mesh)
    stats = jax.devices()[0].memory_stats()
    result["peak_memory_mb"] = (round(stats["peak_bytes_in_use"] / 2**20, 1)
                                if stats and "peak_bytes_in_use" in stats else None)
    return result


def _bench_fused(args, model, variants, compiled, states, cfg, data_x, data_y, n_train, key,
                 mesh):
    """k single steps against one k-step ``lax.scan`` chunk (the RSST program)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rsst_jax import parallel
    from rsst_jax import train as train_lib

    k, bs = args.fused_steps, args.batch_size
    name = "rsst" if "rsst" in states else next(iter(states))
    tx, m, t = variants[name]
    prog = compiled["masked" if m is not None else "dense"]
    batch_sh = None if mesh is None else parallel.batch_sharding(mesh)
    unroll = {"auto": train_lib.fused_unroll(), "unrolled": True, "loop": 1}[args.fused_form]
    chunk = parallel.jit_chunk(train_lib.make_epoch_fn(
        train_lib.make_train_step(model, tx, cfg, batch_sharding=batch_sh), unroll=unroll), mesh)
    scale = jnp.float32(1.0)
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 99), n_train)[: k * bs])
    perm = perm.reshape(k, bs).astype(np.int32)
    rows = [parallel.shard_batch(perm[b], mesh) for b in range(k)]
    perm = parallel.shard_batch(perm, mesh, 1)
    state = states[name]
    t0 = time.perf_counter()
    chunk = chunk.lower(state, data_x, data_y, perm, m, t, scale).compile()
    compile_s = time.perf_counter() - t0
    state, _ = chunk(state, data_x, data_y, perm, m, t, scale)  # warm-up
    jax.block_until_ready(state)
    loop_t, fused_t = [], []
    for _ in range(args.fused_reps):
        t0 = time.perf_counter()
        for b in range(k):
            state, metrics = prog(state, data_x, data_y, rows[b], m, t, scale)
        jax.block_until_ready((state, metrics))
        loop_t.append((time.perf_counter() - t0) / k)
        t0 = time.perf_counter()
        state, metrics = chunk(state, data_x, data_y, perm, m, t, scale)
        jax.block_until_ready((state, metrics))
        fused_t.append((time.perf_counter() - t0) / k)
    states[name] = state
    loop_ms, fused_ms = _median_ms(loop_t), _median_ms(fused_t)
    return {"variant": name, "fused_steps": k, "form": "unrolled" if unroll is True else "loop",
            "compile_s": round(compile_s, 2),
            "loop_step_ms": round(loop_ms, 2), "fused_step_ms": round(fused_ms, 2),
            "speedup": round(loop_ms / fused_ms, 3)}


def _bench_seeds(args, model, variants, cfg, data_x, data_y, n_train, key, shape):
    """The RSST step vmapped over K independent tickets (own weights, masks, batches)."""
    import jax
    import jax.numpy as jnp

    from rsst_jax import train as train_lib

    bs = args.batch_size
    tx, m, t = variants["rsst"]
    # One device: the K tickets are the parallelism here.
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    data_x, data_y, m, t = jax.device_put((data_x, data_y, m, t), one)
    step = train_lib.make_multi_seed_step(train_lib.make_train_step(model, tx, cfg))
    out = []
    for k in (int(v) for v in args.num_seeds.split(",") if v):
        stack = lambda tree: jax.tree_util.tree_map(  # noqa: E731
            lambda x: None if x is None else jnp.stack([x] * k), tree, is_leaf=lambda x: x is None)
        states = jax.vmap(lambda kk: train_lib.create_train_state(model, tx, kk, shape))(
            jax.random.split(key, k))
        masks, targets = stack(m), stack(t)
        perms = jnp.stack([jax.random.permutation(jax.random.fold_in(key, 300 + i), n_train)[:bs]
                           for i in range(k)]).astype(jnp.int32)
        scale = jnp.ones((k,), jnp.float32)
        jitted = jax.jit(step, donate_argnums=(0,))
        t0 = time.perf_counter()
        compiled = jitted.lower(states, data_x, data_y, perms, masks, targets, scale).compile()
        compile_s = time.perf_counter() - t0
        states, _ = compiled(states, data_x, data_y, perms, masks, targets, scale)
        jax.block_until_ready(states)
        times = []
        for _ in range(args.seed_steps):
            t0 = time.perf_counter()
            states, metrics = compiled(states, data_x, data_y, perms, masks, targets, scale)
            jax.block_until_ready((states, metrics))
            times.append(time.perf_counter() - t0)
        ms = _median_ms(times)
        out.append({"num_seeds": k, "step_ms": round(ms, 2), "compile_s": round(compile_s, 2),
                    "images_per_s": round(k * bs / ms * 1e3, 1)})
    return out


def _bench_eval(args, model, cfg, states, names, shape, mesh):
    import jax
    import numpy as np

    from rsst_jax import parallel
    from rsst_jax import train as train_lib

    ebs = args.eval_batch_size
    eval_step = parallel.jit_eval(train_lib.make_eval_step(model, cfg), mesh, ebs)
    state = states[names[0]]
    rng = np.random.default_rng(args.seed + 1)
    x = jax.device_put(rng.integers(0, 256, (ebs, *shape), dtype=np.uint8))
    y = jax.device_put(rng.integers(0, args.num_classes, (ebs,)).astype(np.int32))
    valid = jax.device_put(np.ones((ebs,), bool))
    jax.block_until_ready(eval_step(state.variables, x, y, valid))
    times = []
    for _ in range(args.eval_reps):
        t0 = time.perf_counter()
        jax.block_until_ready(eval_step(state.variables, x, y, valid))
        times.append(time.perf_counter() - t0)
    ms = _median_ms(times)
    return {"batch_size": ebs, "batch_ms": round(ms, 2), "images_per_s": round(ebs / ms * 1e3, 1)}


def _loadavg():
    try:
        return [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


def format_table(r: dict) -> str:
    lines = [f"device {r['device']} ({r['platform']}, {r['device_count']} device(s), batch "
             f"split over {r['mesh_devices']}), jax "
             f"{r['jax']}, load average {r['loadavg']}",
             f"{r['arch']} batch {r['batch_size']} images {tuple(r['image_shape'])} "
             f"{r['num_classes']} classes, {r['precision']}"
             + (f", accum_steps {r['accum_steps']}" if r["accum_steps"] > 1 else ""),
             "compile: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["compile_s"].items()),
             f"{'step':<8}{'ms/step':>10}{'images/s':>11}{'vs dense':>10}"]
    for name, ms in r["step_ms"].items():
        ratio = r["ratio_to_dense"].get(name)
        lines.append(f"{name:<8}{ms:>10.1f}{r['images_per_s'][name]:>11.1f}"
                     f"{'' if ratio is None else f'{ratio:.3f}':>10}")
    gf = r.get("gflop_per_step", {})
    if any(v is not None for v in gf.values()):
        lines.append("XLA flop count per step: " + ", ".join(f"{k} {v} GFLOP" for k, v in gf.items())
                     + "; achieved " + ", ".join(f"{k} {v} TFLOP/s" for k, v in
                                                r["achieved_tflop_s"].items() if v is not None))
    if "fused" in r:
        f = r["fused"]
        lines.append(f"fused {f['variant']} chunk of {f['fused_steps']} steps ({f['form']}): "
                     f"{f['fused_step_ms']:.1f} ms/step vs step loop {f['loop_step_ms']:.1f} "
                     f"ms/step: speedup {f['speedup']:.3f}x (compile {f['compile_s']:.1f} s)")
    for row in r.get("seeds", []):
        lines.append(f"rsst x {row['num_seeds']} tickets (vmap): {row['step_ms']:.1f} ms/step, "
                     f"{row['images_per_s']:.1f} images/s (compile {row['compile_s']:.1f} s)")
    e = r["eval"]
    lines.append(f"eval batch {e['batch_size']}: {e['batch_ms']:.1f} ms, "
                 f"{e['images_per_s']:.1f} images/s")
    lines.append(f"peak device memory: {r['peak_memory_mb']} MiB" if r["peak_memory_mb"]
                 is not None else "peak device memory: not reported by this backend")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from rsst_jax import parallel
    parallel.split_cpu(args.cpu_devices)  # before any JAX operation
    result = run(args)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
