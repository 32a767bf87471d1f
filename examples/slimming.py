"""Network slimming (Liu et al., ICCV 2017) as an rsst-jax method, in one file.

While a round trains, an L1 penalty ``--slim_lambda * sign(gamma)`` pushes the
BatchNorm scales gamma towards zero; at the round's end the channels with the smallest
``|gamma|`` over the whole network are removed, ``--rate`` of those still alive (at
least one channel stays in every layer). The next round trains the rewound weights of
the channels that are left, as every method here does.

    python -m experiments.run --import examples.slimming --struct slimming \
        --dataset digits --pruning_times 3 --epochs 10 --lr 0.1 --warmup 1 \
        --decreasing_lr 7,9 --batch_size 64 --rate 0.3 --save_dir runs/digits_slim

docs/methods.md explains each part.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rsst_jax import config, model_masks, trees
from rsst_jax.methods import Method, register_method


@dataclasses.dataclass(frozen=True)
class SlimmingConfig:
    """The method's own flags: they join --help, config.json, sweeps and the README."""
    slim_lambda: float = config.flag(1e-4, "(slimming) L1 penalty on the BatchNorm scales",
                                     finite=True)  # not groupable: transform closes over it


config.register_group("slimming", SlimmingConfig)


def l1_penalty(strength: float) -> optax.GradientTransformationExtraArgs:
    """Add ``strength * sign(w)`` to the gradient of every entry the plan targets."""

    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None, *, reg_targets=None, **extra):
        def penalize(target, grad, weight):
            if target is None:
                return grad
            return jnp.where(target, grad + strength * jnp.sign(weight), grad)
        return jax.tree_util.tree_map(penalize, reg_targets, updates, params,
                                      is_leaf=trees.is_none), state

    return optax.GradientTransformationExtraArgs(init, update)


def _get(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _with(tree, path: str, leaf):
    """A copy of the nested dict ``tree`` with the leaf at ``path`` replaced."""
    head, _, rest = path.partition("/")
    return {**tree, head: _with(tree[head], rest, leaf) if rest else leaf}


@register_method
class Slimming(Method):
    name = "slimming"
    title = "Slimming"
    summary = "L1 on BatchNorm scales; channels with the smallest scales removed"
    channels = True                        # whole channels: --mask_bn on by default
    settings = ("slimming", SlimmingConfig)
    epoch_fields = ("bn_scale_l1",)        # logged every epoch, drawn by TensorBoard

    def check(self, cfg, need, *, chosen):
        need(not chosen or cfg.prune.mask_bn is not False,
             "--struct slimming penalizes the BatchNorm scales; leave --mask_bn on")

    def describe(self, config: dict) -> dict:
        return {"criteria": "BatchNorm scale", "schedule": f"L1 {config.get('slim_lambda')}"}

    def transform(self, cfg):
        return l1_penalty(cfg.slimming.slim_lambda)

    def targets(self, net, params_like, prune_cfg, alive, channel_masks):
        """The BatchNorm scales of the live channels (in ``alive``), in every round."""
        return jax.tree_util.tree_map_with_path(
            lambda path, m: None if m is None else
            (m if trees.join(path).endswith("scale") else jnp.zeros_like(m)),
            alive, is_leaf=trees.is_none)

    def next_masks(self, net, variables, masks, prune_cfg, round_idx, *, key, score_batches,
                   mean, std):
        pairs = [(conv, bn) for conv, bn in model_masks.conv_bn_pairs(net.model, net.image_shape)
                 if _get(masks, f"{conv}/kernel") is not None]
        alive = {conv: np.asarray(_get(masks, f"{conv}/kernel")).reshape(-1, _get(
            masks, f"{conv}/kernel").shape[-1]).any(0) for conv, _ in pairs}
        scores = [(float(abs(gamma)), conv, c) for conv, bn in pairs
                  for c, gamma in enumerate(np.asarray(_get(variables["params"], f"{bn}/scale")))
                  if alive[conv][c]]
        remove = int(round(prune_cfg.rate_at(round_idx) * len(scores)))
        for _, conv, c in sorted(scores)[:remove]:
            if alive[conv].sum() > 1:      # never a whole layer
                alive[conv][c] = False
        for conv, keep in alive.items():
            kernel = _get(masks, f"{conv}/kernel")
            masks = _with(masks, f"{conv}/kernel", jnp.logical_and(kernel, jnp.asarray(keep)))
        return masks, None

    def epoch_fields_of(self, run, k, metrics, scale):
        params = trees.ticket(run.states.params, k)
        targets = trees.ticket(run.plan.step.targets, k)
        total = sum(float(np.abs(np.asarray(w))[np.asarray(t)].sum()) for w, t in zip(
            jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(
                targets, is_leaf=trees.is_none)) if t is not None)
        return {"bn_scale_l1": total}
