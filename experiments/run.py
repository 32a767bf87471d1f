"""Find lottery tickets: ``python -m experiments.run --dataset digits``.

Flags follow the PyTorch reference's ``main_imp_fillback.py``; ``--help`` lists them all.
Exit codes: 0 done, 2 bad input (one-line message, no traceback), 3 training diverged.
"""
from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np

from experiments import cli
from rsst_jax import checkpoint, driver, engine, methods, model_masks, parallel, runlock, starting
from rsst_jax import data as data_lib
from rsst_jax import masks as masks_lib
from rsst_jax import train as train_lib


def describe_plan(cfg, ds, n_params: int, n_prunable: int) -> str:
    """The --dry_run report: data found, network size, rounds with expected densities."""
    d, p, o = cfg.data, cfg.prune, cfg.optim
    where = d.data or "its default location"
    lines = [f"data set {d.dataset} found ({where}): train {len(ds.train_y)}, val "
             f"{len(ds.val_y)}, test {len(ds.test_y)} images of shape {ds.image_shape}, "
             f"{ds.num_classes} classes",
             f"network {cfg.model.arch}: {n_params:,} parameters, {n_prunable:,} prunable",
             f"{p.pruning_times} rounds x {o.epochs} epochs, struct {p.struct}, "
             f"prune {p.prune_method}/{p.prune_scope} rate {p.rate}, rewind {p.prune_type}"]
    density, kept = 1.0, n_prunable
    exact = p.prune_method != "filter" and p.prune_scope == "global" and not p.layer_rates
    for r in range(p.pruning_times):
        count = f" ({kept:,} prunable weights)" if exact else ""
        lines.append(f"  round {r}: expected remaining weights {100 * density:.2f}%{count}")
        density *= 1.0 - p.rate_at(r)
        kept -= int(round(p.rate_at(r) * kept))  # the count magnitude_prune removes
    if methods.of(cfg).channels and p.pruning_times > 1:
        lines.append(f"  ({p.struct}: whole channels are kept per layer, so rounds after 0 "
                     f"keep about these densities, channel-wise)")
    return "\n".join(lines)


def _check_save_dir_state(cfg) -> str:
    """What --save_dir holds, raising what a real run would raise before training."""
    save_dir = pathlib.Path(cfg.run.save_dir)
    if save_dir.is_dir():
        runlock.RunLock(save_dir).acquire().release()  # raises RunLocked while a run holds it
    source = starting.resume_source(cfg)  # raises what the run would raise
    if source is None:
        return f"save_dir {save_dir}: new run"
    latest = checkpoint.latest_step(source)
    meta = checkpoint.read_meta(source)
    return (f"save_dir {save_dir}: resumes from {source / str(latest)} at round "
            f"{meta.get('round')}, epoch {meta.get('epoch')}")


def dry_run(cfg) -> None:
    """Print the resolved config and the plan; load the data and build the network
    abstractly (no parameters are computed)."""
    ds = data_lib.train_subset(data_lib.load_dataset(cfg.data.dataset, cfg.data.data),
                               cfg.data.train_subset)
    model = engine.build_model(cfg.model, ds.num_classes)
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), np.zeros((1, *ds.image_shape), np.float32), train=False))
    params = shapes["params"]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    flags = masks_lib.prunable(params, conv1=cfg.prune.conv1, fc=cfg.prune.prune_dense,
                               stem=model_masks.stem_kernel(model, ds.image_shape))
    n_prunable = sum(int(np.prod(x.shape)) for x, f in
                     zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(flags)) if f)
    state = _check_save_dir_state(cfg)
    print(json.dumps(dict(cfg.to_dict(), seed=cfg.run.resolved_seed), indent=1))
    print(describe_plan(cfg, ds, n_params, n_prunable))
    for line in penalty_lines(cfg, len(ds.train_y)):
        print(line)
    print(state)


def penalty_lines(cfg, n_train: int) -> list[str]:
    """What the run would say before training about its method (``Method.start``;
    RSST: its penalty's stability and budget)."""
    schedules = engine.schedules_of(cfg, train_lib.steps_per_epoch(n_train,
                                                                   cfg.optim.batch_size))
    return methods.of(cfg).start(cfg, schedules)[1]


def seed_configs(cfg) -> list:
    """--num_seeds K: one configuration per ticket, seeds --seed .. --seed+K-1, each in
    SAVE_DIR/seed_<s> (and --init/seed_<s>)."""
    if cfg.run.num_seeds == 1:
        return [cfg]
    base = cfg.run.resolved_seed
    return [cfg.replace(seed=s, num_seeds=1,
                        save_dir=str(pathlib.Path(cfg.run.save_dir) / f"seed_{s}"),
                        init=None if cfg.run.init is None else
                        str(pathlib.Path(cfg.run.init) / f"seed_{s}"))
            for s in range(base, base + cfg.run.num_seeds)]


def main(argv=None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit code:
    0 done, 2 bad input, 3 diverged, 130 interrupted (Ctrl-C names the command that
    resumes; see ``cli.run_command``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parallel.split_cpu()  # $RSST_JAX_CPU_DEVICES, before any JAX operation

    def body() -> int:
        try:
            cli.import_modules(cli.imports_of(argv))  # registrations before the check
            cfg = cli.parse_run_args(argv)
        except SystemExit as e:  # --help printed the help
            return int(e.code or 0)
        parallel.init_distributed(**cli.host_values(argv))  # before JAX computes anything
        cli.check_paths(cfg)
        if cfg.run.dry_run:
            dry_run(cfg)
            return 0
        parallel.enable_compilation_cache()  # $RSST_JAX_CACHE; before the first compile
        driver.run(seed_configs(cfg))
        return 0

    return cli.run_command(body, resume=cli.resume_command("experiments.run", argv))


if __name__ == "__main__":
    sys.exit(main())
