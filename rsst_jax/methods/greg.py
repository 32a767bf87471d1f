"""Growing regularization, GReg-1 (``--struct greg``): Wang, Qin, Zhang and Fu, "Neural
Pruning via Growing Regularization", ICLR 2021.

GReg-1 chooses the filters to remove by their L1 norm, then puts an L2 penalty on
exactly those, its coefficient growing by ``delta`` every ``K_u`` iterations up to a
ceiling, and removes them once they are pushed to (near) zero. In this procedure the
choice is made as a round starts (``next_masks`` after the previous round, on its
trained weights): in every prunable layer ``--rate`` of the live channels with the
smallest kernel L1 norm; the round trains all live channels with
``lambda_c * w`` added to the gradient of the chosen ones, where ``lambda_c`` starts at 0
and grows by ``--greg_delta`` every ``--greg_interval`` optimizer steps (first at the
round's first step) up to ``--greg_ceiling``; at the round's end the driver removes them
(the channel masks S), recording the accuracy before and after, as for RSST.

The per-channel lambda is the state of the method's transformation (:class:`GRegState`),
so checkpoints carry it and a resumed round continues its growth exactly; it restarts
at 0 with the optimizer each round.

Choices the procedure forces, or the paper leaves:
- Round 0 trains the dense network without a penalty (nothing is chosen yet); the paper
  starts from a pretrained network, which round 0 provides.
- The round has a fixed length, so the penalty grows until the round ends (the paper
  stops growing at the ceiling and trains on a while; a ceiling reached early does so).
- Like RSST, with --mask_bn (the default) the chosen channels' BatchNorm scale and bias
  are penalized too, because BatchNorm undoes any shrinking of a kernel slice alone.
- The defaults are the official code's (delta 1e-4 every 5 iterations up to a ceiling of
  1, set for ImageNet-length schedules); a round of a few hundred steps needs a larger
  delta to reach the ceiling (docs/baselines.md runs 0.125 every 10 steps).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rsst_jax import config as config_lib
from rsst_jax import masks as masks_lib
from rsst_jax import trees
from rsst_jax.config import flag
from rsst_jax.methods.base import Method, Penalty
from rsst_jax.methods.registry import register_method
from rsst_jax.metrics import Metric


@dataclasses.dataclass(frozen=True)
class GRegConfig:
    greg_delta: float = flag(1e-4, "(new) GReg: growth of the chosen channels' L2 penalty "
                             "per update", finite=True)
    greg_interval: int = flag(5, "(new) GReg: optimizer steps between penalty updates")
    greg_ceiling: float = flag(1.0, "(new) GReg: the penalty's ceiling", finite=True)


config_lib.register_group("greg", GRegConfig)


class GRegState(NamedTuple):
    """``count``: steps taken this round; ``lam``: per parameter leaf, lambda of each of its
    output channels (last axis)."""
    count: jax.Array
    lam: dict


def growing_l2(delta: float, interval: int, ceiling: float
               ) -> optax.GradientTransformationExtraArgs:
    """At step t (from 0), where ``t % interval == 0``, lambda of every channel the bool
    ``reg_targets`` select grows by ``delta`` (capped at ``ceiling``); then ``lambda_c * w``
    is added to the gradient of the selected entries. So after step t a chosen channel has
    ``min(ceiling, delta * (t // interval + 1))``."""

    def init(params):
        return GRegState(jnp.zeros([], jnp.int32), jax.tree_util.tree_map(
            lambda p: jnp.zeros(jnp.shape(p)[-1:], jnp.float32), params))

    def update(updates, state, params=None, *, reg_targets=None, **extra):
        del extra
        grow = state.count % interval == 0

        def chosen(t):
            return t.reshape(-1, t.shape[-1]).any(axis=0) if t.ndim else t.reshape(1)

        lam = trees.update_masked(lambda t, lam: jnp.where(
            grow & chosen(t), jnp.minimum(lam + delta, ceiling), lam), reg_targets, state.lam)
        out = trees.update_masked(lambda t, g, w, lm: jnp.where(t, g + (lm * w).astype(g.dtype),
                                                                g),
                                  reg_targets, updates, params, lam)
        return out, GRegState(optax.safe_int32_increment(state.count), lam)

    return optax.GradientTransformationExtraArgs(init, update)


def smallest_l1(masks, params, rate: float):
    """Channel masks S: ``masks`` without, in every prunable layer, ``round(rate * n)`` of
    its n live output channels with the smallest L1 norm (one channel at least stays)."""
    flat = trees.flat_dict(params)
    for path, alive in masks_lib.live_channels(masks).items():
        w = np.abs(np.asarray(flat[path], np.float64)).reshape(-1, alive.size).sum(axis=0)
        units = [(w[c], [(path, c)]) for c in np.flatnonzero(alive)]
        masks = masks_lib.remove_units(masks, units, int(round(rate * len(units))))
    return masks


@register_method
class GReg(Method):
    name = "greg"
    title = "GReg"
    summary = ("channels chosen by L1 norm, pushed to zero by a growing L2 penalty, removed "
               "at the round's end")
    paper = "Wang et al., Neural Pruning via Growing Regularization, ICLR 2021"
    channels = True
    settings = ("greg", GRegConfig)
    metrics = (Metric("greg_lambda", "lambda of the chosen channels", log_scale=True,
                      line="lambda {greg_lambda:.3g}"),)
    markers = {"GReg": "*"}

    def check(self, cfg, need):
        g = cfg.greg
        need(g.greg_delta > 0, f"--greg_delta must be > 0, got {g.greg_delta}")
        need(g.greg_interval >= 1, f"--greg_interval must be >= 1, got {g.greg_interval}")
        need(g.greg_ceiling > 0, f"--greg_ceiling must be > 0, got {g.greg_ceiling}")

    def describe(self, config):
        return {"criteria": "L1 norm", "schedule": f"+{config.get('greg_delta')}/"
                f"{config.get('greg_interval')} steps to {config.get('greg_ceiling')}"}

    def penalty(self, cfg):
        g = cfg.greg
        return Penalty(growing_l2(g.greg_delta, g.greg_interval, g.greg_ceiling))

    def next_masks(self, ticket, scoring):
        rate = ticket.cfg.prune.rate_at(ticket.round)
        return ticket.masks, smallest_l1(ticket.masks, ticket.params, rate)

    def targets(self, cfg, net, alive, alive_s):
        """The live channels S removes (with --mask_bn their BatchNorm too)."""
        if alive_s is None:
            return None
        return trees.map_masks(lambda m, s: jnp.logical_and(m, jnp.logical_not(s)),
                               alive, alive_s)

    def epoch_values(self, ticket, metrics):
        if ticket.channel_masks is None or ticket.penalty_state is None:
            return {}
        return {"greg_lambda": max(float(np.max(np.asarray(lam), initial=0.0)) for lam in
                                   jax.tree_util.tree_leaves(ticket.penalty_state.lam))}


__all__ = ["GReg", "GRegConfig", "GRegState", "growing_l2", "smallest_l1"]
