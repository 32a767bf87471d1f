"""Find lottery tickets: ``python -m experiments.run --dataset digits``.

Flags follow the PyTorch reference's ``main_imp_fillback.py``; ``--help`` lists them all.
Exit codes: 0 done, 2 bad input (one-line message, no traceback), 3 training diverged.
"""
from __future__ import annotations

import sys

from rsst_jax import config as config_lib


def describe_plan(cfg, ds, n_params: int, n_prunable: int) -> str:
    lines = [f"data set {cfg.dataset}: train {len(ds.train_y)}, val {len(ds.val_y)}, "
             f"test {len(ds.test_y)} images of shape {ds.image_shape}, {ds.num_classes} classes",
             f"network {cfg.arch}: {n_params:,} parameters, {n_prunable:,} prunable",
             f"{cfg.pruning_times} rounds x {cfg.epochs} epochs, struct {cfg.struct}, "
             f"prune {cfg.prune_method}/{cfg.prune_scope} rate {cfg.rate}, rewind {cfg.prune_type}"]
    density = 1.0
    for r in range(cfg.pruning_times):
        lines.append(f"  round {r}: expected remaining weights {100 * density:.2f}%")
        density *= 1.0 - cfg.rate_at(r)
    return "\n".join(lines)


def main(argv=None) -> int:
    from rsst_jax import data as data_lib
    try:
        cfg = config_lib.validate(config_lib.parse_args(argv))
        config_lib.check_save_dir(cfg.save_dir)
        if cfg.dry_run:
            import json
            import jax
            import numpy as np
            from rsst_jax import lottery, masks as masks_lib
            ds = data_lib.load_dataset(cfg.dataset, cfg.data, seed=cfg.resolved_seed)
            model = lottery.build_model(cfg, ds.num_classes)
            shapes = jax.eval_shape(lambda: model.init(
                jax.random.PRNGKey(0), np.zeros((1, *ds.image_shape), np.float32), train=False))
            params = shapes["params"]
            n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
            flags = masks_lib.prunable(params, conv1=cfg.conv1, fc=cfg.prune_dense)
            n_prunable = sum(int(np.prod(x.shape)) for x, f in
                             zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(flags)) if f)
            print(json.dumps(dict(cfg.to_dict(), seed=cfg.resolved_seed), indent=1))
            print(describe_plan(cfg, ds, n_params, n_prunable))
            return 0
        from rsst_jax import lottery
        lottery.run(cfg)
        return 0
    except (config_lib.ConfigError, data_lib.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from rsst_jax import checkpoint, lottery
        if isinstance(e, (lottery.RunError, checkpoint.CheckpointError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, lottery.TrainingDiverged):
            print(f"error: {e}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
