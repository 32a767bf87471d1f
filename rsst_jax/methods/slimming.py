"""Network slimming (``--struct slimming``): Liu, Li, Shen, Huang, Yan and Zhang,
"Learning Efficient Convolutional Networks through Network Slimming", ICCV 2017.

The paper trains with an L1 penalty on the BatchNorm scales gamma (a subgradient
``lambda * sign(gamma)`` added to their gradient), then removes the channels whose
``|gamma|`` is smallest over the whole network by one global threshold, and fine-tunes.
In this procedure each round trains with ``--slim_lambda * sign(gamma)`` on the scales of
the live channels; after the round, ``--rate`` of the live channels, those with the
smallest ``|gamma|`` over the network, are removed (``masks.remove_channels``); the next
round trains the rewound weights of the channels left, as every method here does.

Choices the procedure forces, or the paper leaves:
- The paper picks a percentile of all scales; here that percentile is ``--rate`` of the
  live channels per round, so rounds compare at the sparsity of the other methods.
- At least one channel stays in every layer (the paper's threshold can empty a layer,
  which its code then guards by hand).
- Only channels whose convolution is followed by a BatchNorm are scored (the method
  reads gamma); others keep their channels.
- The penalty strength does not vary between tickets of one program (the transformation
  closes over it), so ``--slim_lambda`` is not groupable.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax

from rsst_jax import config as config_lib
from rsst_jax import masks as masks_lib
from rsst_jax import model_masks, trees
from rsst_jax.config import flag
from rsst_jax.methods.base import Method, Penalty
from rsst_jax.methods.registry import register_method
from rsst_jax.metrics import Metric


@dataclasses.dataclass(frozen=True)
class SlimmingConfig:
    slim_lambda: float = flag(1e-4, "(new) L1 penalty on the BatchNorm scales, the paper's "
                              "lambda (1e-4 for its VGG, 1e-5 for its ResNets)", finite=True)


config_lib.register_group("slimming", SlimmingConfig)


def l1_penalty(strength: float) -> optax.GradientTransformationExtraArgs:
    """Add ``strength * sign(w)`` to the gradient of every entry the targets select
    (the subgradient of ``strength * |w|``; 0 at w = 0)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, reg_targets=None, **extra):
        del extra
        return trees.update_masked(lambda t, g, w: jnp.where(t, g + strength * jnp.sign(w), g),
                                   reg_targets, updates, params), state

    return optax.GradientTransformationExtraArgs(init, update)


def bn_scales(net, params) -> dict[str, np.ndarray]:
    """{conv kernel path: |gamma| [C] of the BatchNorm that follows the conv}."""
    flat = trees.flat_dict(params)
    return {f"{conv}/kernel": np.abs(np.asarray(flat[f"{bn}/scale"]))
            for conv, bn in model_masks.conv_bn_pairs(net.model, net.image_shape)
            if f"{bn}/scale" in flat}


@register_method
class Slimming(Method):
    name = "slimming"
    title = "Slimming"
    summary = "L1 on the BatchNorm scales; the channels with the smallest scales removed"
    paper = ("Liu et al., Learning Efficient Convolutional Networks through Network "
             "Slimming, ICCV 2017")
    channels = True
    settings = ("slimming", SlimmingConfig)
    metrics = (Metric("bn_scale_l1", "L1 norm of the live channels' BatchNorm scales"),)
    markers = {"Slimming": "P"}

    def check(self, cfg, need):
        need(cfg.prune.mask_bn is not False,
             "--struct slimming penalizes the BatchNorm scales; leave --mask_bn on")

    def describe(self, config):
        return {"criteria": "BatchNorm scale", "schedule": f"L1 {config.get('slim_lambda')}"}

    def penalty(self, cfg):
        return Penalty(l1_penalty(cfg.slimming.slim_lambda))

    def targets(self, cfg, net, alive, alive_s):
        """The BatchNorm scales of the live channels (``alive`` holds them: --mask_bn)."""
        return trees.map_masks_with_path(
            lambda path, m: m if path.endswith("scale") else jnp.zeros_like(m), alive)

    def next_masks(self, ticket, scoring):
        return masks_lib.remove_channels(ticket.masks, bn_scales(ticket.net, ticket.params),
                                         ticket.cfg.prune.rate_at(ticket.round)), None

    def epoch_values(self, ticket, metrics):
        total = sum(float(np.abs(np.asarray(w))[np.asarray(t)].sum())
                    for (_, w), (_, t) in zip(trees.items(ticket.params),
                                              trees.items(ticket.targets)) if t is not None)
        return {"bn_scale_l1": total}


__all__ = ["Slimming", "SlimmingConfig", "l1_penalty", "bn_scales"]
