"""Taylor channel importance (Molchanov et al., "Importance Estimation for Neural
Network Pruning", CVPR 2019) as an rsst-jax method, in one file.

A channel's importance is the first-order Taylor estimate of how much the loss changes
when the channel is removed, taken at its BatchNorm: ``(gamma * dL/dgamma + beta *
dL/dbeta) ** 2``, averaged over training steps. While a round trains, the method's own
optax transformation adds this up for every live channel (it changes no gradient); its
state is part of the optimizer state, so every checkpoint carries the sum and a resumed
round continues it exactly. At the round's end, ``--rate`` of the live channels with the
least importance over the whole network are removed (at least one stays in every layer).

    python -m experiments.run --import examples.taylor --struct taylor \
        --dataset digits --pruning_times 3 --epochs 10 --lr 0.1 --warmup 1 \
        --decreasing_lr 7,9 --batch_size 64 --rate 0.3 --save_dir runs/digits_taylor

docs/methods.md explains each part.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rsst_jax import config, masks, model_masks, trees
from rsst_jax.methods import Method, Penalty, register_method
from rsst_jax.metrics import Metric


@dataclasses.dataclass(frozen=True)
class TaylorConfig:
    """The method's own flags: they join --help, config.json, sweeps and the README."""
    taylor_skip: int | None = config.flag(
        None, "(taylor) steps at the start of each round left out of the importance "
        "(default: none)")


config.register_group("taylor", TaylorConfig)


class TaylorState(NamedTuple):
    """The compiled step's part of the method's state: steps seen, and per BatchNorm
    scale the importance summed over the steps counted (shaped like the parameters)."""
    count: jax.Array
    total: dict


def taylor_sum(skip: int) -> optax.GradientTransformationExtraArgs:
    """Adds ``(gamma * g_gamma + beta * g_beta) ** 2`` of every channel whose BatchNorm
    scale ``reg_targets`` selects to the state, from step ``skip`` of the round on; the
    gradient passes unchanged."""

    def init(params):
        return TaylorState(jnp.zeros([], jnp.int32),
                           jax.tree_util.tree_map(jnp.zeros_like, params))

    def add(total, params, grads, targets):
        if not isinstance(params, dict):
            return total
        out = {k: add(total[k], params[k], grads[k], targets[k]) for k in params}
        if "scale" in params and "bias" in params and targets["scale"] is not None:
            first = params["scale"] * grads["scale"] + params["bias"] * grads["bias"]
            out["scale"] = total["scale"] + jnp.where(targets["scale"], first ** 2, 0.0)
        return out

    def update(updates, state, params=None, *, reg_targets=None, **extra):
        counted = add(state.total, params, updates, reg_targets)
        total = jax.tree_util.tree_map(lambda new, old: jnp.where(state.count >= skip, new, old),
                                       counted, state.total)
        return updates, TaylorState(optax.safe_int32_increment(state.count), total)

    return optax.GradientTransformationExtraArgs(init, update)


def importance(net, state: TaylorState) -> dict[str, np.ndarray]:
    """{conv kernel path: mean importance [C] of its channels}, from the method's state."""
    steps = max(1, int(state.count))
    total = trees.flat_dict(state.total)
    return {f"{conv}/kernel": np.asarray(total[f"{bn}/scale"]) / steps
            for conv, bn in model_masks.conv_bn_pairs(net.model, net.image_shape)}


@register_method
class Taylor(Method):
    name = "taylor"
    title = "Taylor"
    summary = "first-order Taylor importance at the BatchNorm; least important channels go"
    paper = "Molchanov et al., Importance Estimation for Neural Network Pruning, CVPR 2019"
    channels = True                        # whole channels: --mask_bn on by default
    settings = ("taylor", TaylorConfig)
    metrics = (Metric("taylor_importance", "mean Taylor importance of the live channels",
                      log_scale=True),)

    def check(self, cfg, need):
        skip = cfg.taylor.taylor_skip
        need(skip is None or skip >= 0, f"--taylor_skip must be >= 0, got {skip}")

    def describe(self, config):
        return {"criteria": "Taylor (BatchNorm)", "schedule": "-"}

    def penalty(self, cfg):
        return Penalty(taylor_sum(cfg.taylor.taylor_skip or 0))

    def targets(self, cfg, net, alive, alive_s):
        """The BatchNorm scales of the live channels (``alive`` holds them: --mask_bn)."""
        return trees.map_masks_with_path(
            lambda path, m: m if path.endswith("scale") else jnp.zeros_like(m), alive)

    def next_masks(self, ticket, scoring):
        scores = importance(ticket.net, ticket.penalty_state)
        rate = ticket.cfg.prune.rate_at(ticket.round)
        return masks.remove_channels(ticket.masks, scores, rate), None

    def epoch_values(self, ticket, metrics):
        live = masks.live_channels(ticket.masks)
        scores = importance(ticket.net, ticket.penalty_state)
        values = [s[live[p]] for p, s in scores.items() if p in live]
        return {"taylor_importance": float(np.mean(np.concatenate(values)))}
