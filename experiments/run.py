"""Find lottery tickets: ``python -m experiments.run --dataset digits``.

Flags follow the PyTorch reference's ``main_imp_fillback.py``; ``--help`` lists them all.
Exit codes: 0 done, 2 bad input (one-line message, no traceback), 3 training diverged.
"""
from __future__ import annotations

import contextlib
import io
import sys

from rsst_jax import config as config_lib


def describe_plan(cfg, ds, n_params: int, n_prunable: int) -> str:
    """The --dry_run report: data found, network size, rounds with expected densities."""
    where = cfg.data or "its default location"
    lines = [f"data set {cfg.dataset} found ({where}): train {len(ds.train_y)}, val "
             f"{len(ds.val_y)}, test {len(ds.test_y)} images of shape {ds.image_shape}, "
             f"{ds.num_classes} classes",
             f"network {cfg.arch}: {n_params:,} parameters, {n_prunable:,} prunable",
             f"{cfg.pruning_times} rounds x {cfg.epochs} epochs, struct {cfg.struct}, "
             f"prune {cfg.prune_method}/{cfg.prune_scope} rate {cfg.rate}, rewind {cfg.prune_type}"]
    density, kept = 1.0, n_prunable
    exact = cfg.prune_method != "filter" and cfg.prune_scope == "global" and not cfg.layer_rates
    for r in range(cfg.pruning_times):
        count = f" ({kept:,} prunable weights)" if exact else ""
        lines.append(f"  round {r}: expected remaining weights {100 * density:.2f}%{count}")
        density *= 1.0 - cfg.rate_at(r)
        kept -= int(round(cfg.rate_at(r) * kept))  # the count magnitude_prune removes
    if cfg.struct != "none" and cfg.pruning_times > 1:
        lines.append(f"  ({cfg.struct}: whole channels are kept per layer, so rounds after 0 "
                     f"keep about these densities, channel-wise)")
    return "\n".join(lines)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or e.__class__.__name__


def _parse(argv):
    """``config_lib.parse_args`` with argparse's usage text and error folded into one
    ConfigError line (argparse prints two or more lines and exits 2 by itself)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return config_lib.parse_args(argv)
    except SystemExit as e:
        if not e.code:  # --help
            raise
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        text = lines[-1].split(": error: ", 1)[-1] if lines else "bad command line"
        raise config_lib.ConfigError(f"{text} (see python -m experiments.run --help)") from None


def _check_save_dir_state(cfg) -> str:
    """What --save_dir holds, raising what a real run would raise before training."""
    from rsst_jax import checkpoint, lottery, runlock
    import pathlib
    save_dir = pathlib.Path(cfg.save_dir)
    runlock.RunLock(save_dir).acquire().release()  # raises RunLocked while a run holds it
    source = lottery.resume_source(cfg)  # raises what the run would raise
    if source is None:
        return f"save_dir {save_dir}: new run"
    latest = checkpoint.latest_step(source)
    meta = checkpoint.read_meta(source)
    return (f"save_dir {save_dir}: resumes from {source / str(latest)} at round "
            f"{meta.get('round')}, epoch {meta.get('epoch')}")


def dry_run(cfg) -> None:
    """Print the resolved config and the plan; load the data and build the network
    abstractly (no parameters are computed)."""
    import json

    import jax
    import numpy as np

    from rsst_jax import data as data_lib
    from rsst_jax import lottery
    from rsst_jax import masks as masks_lib
    ds = data_lib.load_dataset(cfg.dataset, cfg.data, seed=cfg.resolved_seed)
    model = lottery.build_model(cfg, ds.num_classes)
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), np.zeros((1, *ds.image_shape), np.float32), train=False))
    params = shapes["params"]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    from rsst_jax import compact
    flags = masks_lib.prunable(params, conv1=cfg.conv1, fc=cfg.prune_dense,
                               stem=compact.stem_kernel(model, ds.image_shape))
    n_prunable = sum(int(np.prod(x.shape)) for x, f in
                     zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(flags)) if f)
    state = _check_save_dir_state(cfg)
    print(json.dumps(dict(cfg.to_dict(), seed=cfg.resolved_seed), indent=1))
    print(describe_plan(cfg, ds, n_params, n_prunable))
    print(state)


def main(argv=None) -> int:
    """Run the command line ``argv``; returns the exit code (0, 2 bad input, 3 diverged)."""
    from rsst_jax import parallel
    parallel.split_cpu()  # $RSST_JAX_CPU_DEVICES, before any JAX operation
    from rsst_jax import checkpoint
    from rsst_jax import data as data_lib
    from rsst_jax import runlock
    try:
        try:
            cfg = config_lib.validate(_parse(argv))
        except SystemExit as e:  # --help printed the help
            return int(e.code or 0)
        config_lib.check_save_dir(cfg.save_dir)
        if cfg.dry_run:
            dry_run(cfg)
            return 0
        parallel.enable_compilation_cache()  # $RSST_JAX_CACHE; before the first compile
        if cfg.num_seeds > 1:  # K tickets in one vmapped program, SAVE_DIR/seed_<s>/
            from rsst_jax import multiseed
            multiseed.run(cfg)
            return 0
        from rsst_jax import lottery
        lottery.run(cfg)
        return 0
    except (config_lib.ConfigError, data_lib.DataError, checkpoint.CheckpointError,
            runlock.RunLocked) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        from rsst_jax import lottery
        if isinstance(e, lottery.RunError):
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return 2
        if isinstance(e, lottery.TrainingDiverged):
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return 3
        if isinstance(e, OSError) and e.filename:
            print(f"error: {e.filename}: {e.strerror or _one_line(e)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
