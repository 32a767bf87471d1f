"""Structured sparsity learning, group lasso on output channels (``--struct ssl``): Wen,
Wu, Wang, Chen and Li, "Learning Structured Sparsity in Deep Neural Networks", NeurIPS
2016.

SSL adds ``lambda_g * sum_g ||w_g||_2`` over groups of weights to the loss, so whole
groups reach zero, and removes the groups whose norm is (close to) zero. Here the groups
are the output channels (the paper's filter-wise groups): while a round trains, every
live channel g gets ``--ssl_lambda * w / ||w_g||`` added to its gradient
(``regularizers.group_lasso``); after the round, ``--rate`` of the live channels, those
with the smallest group norm over the whole network, are removed
(``masks.remove_channels``), and the next round trains the rewound weights of the
channels left.

Choices the procedure forces, or the paper leaves:
- A channel's group is its kernel slice and, with --mask_bn (the default), the scale and
  bias of the BatchNorm that follows: BatchNorm undoes any shrinking of a kernel slice
  alone (its output does not depend on the slice's scale), so only the whole channel's
  group can reach zero in today's networks (the paper's networks had little BatchNorm).
- The paper removes the groups below a norm threshold; here ``--rate`` of the live
  channels per round, so rounds compare at the other methods' sparsity. At least one
  channel stays in every layer.
- ``--ssl_lambda`` is closed over by the transformation, so it is not groupable.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from rsst_jax import config as config_lib
from rsst_jax import masks as masks_lib
from rsst_jax import model_masks, regularizers, trees
from rsst_jax.config import flag
from rsst_jax.methods.base import Method, Penalty
from rsst_jax.methods.registry import register_method
from rsst_jax.metrics import Metric


@dataclasses.dataclass(frozen=True)
class SSLConfig:
    ssl_lambda: float = flag(1e-3, "(new) group lasso strength on the output channels "
                             "(the paper's lambda_g)", finite=True)


config_lib.register_group("ssl", SSLConfig)


def channel_bases(masks) -> dict[str, int]:
    """{prunable kernel path: id of its channel 0}: the channels of all prunable leaves
    numbered one after another, in flatten order."""
    bases, n = {}, 0
    for path, m in trees.items(masks):
        if m is not None and path.endswith("kernel"):
            bases[path] = n
            n += int(np.shape(m)[-1])
    return bases


def channel_groups(net, alive):
    """int32 group ids shaped like ``alive``: a live output channel's kernel entries and
    the scale and bias of the BatchNorm after it share the channel's id; -1 elsewhere."""
    bases = channel_bases(alive)
    owner = {f"{bn}/{leaf}": f"{conv}/kernel"
             for conv, bn in model_masks.conv_bn_pairs(net.model, net.image_shape)
             for leaf in ("scale", "bias")}

    def ids(path, m):
        kernel = path if path in bases else owner.get(path)
        if kernel not in bases:
            return jnp.full(jnp.shape(m), -1, jnp.int32)
        channel = bases[kernel] + jnp.arange(jnp.shape(m)[-1], dtype=jnp.int32)
        return jnp.where(m, jnp.broadcast_to(channel, jnp.shape(m)), -1)
    return trees.map_masks_with_path(ids, alive)


def channel_norms(masks, params, group_ids) -> dict[str, np.ndarray]:
    """{kernel path: ||w_g|| [C]} of each prunable leaf's channels (0 for dead ones)."""
    norms = regularizers.group_norms(params, group_ids)
    out = {}
    for path, base in channel_bases(masks).items():
        c = int(np.shape(trees.flat_dict(masks)[path])[-1])
        out[path] = np.pad(norms, (0, max(0, base + c - len(norms))))[base:base + c]
    return out


@register_method
class SSL(Method):
    name = "ssl"
    title = "SSL"
    summary = "group lasso on the output channels; the channels of smallest norm removed"
    paper = ("Wen et al., Learning Structured Sparsity in Deep Neural Networks, "
             "NeurIPS 2016")
    channels = True
    settings = ("ssl", SSLConfig)
    metrics = (Metric("group_norm_sum", "sum of the live channels' group norms"),)
    markers = {"SSL": "X"}

    def check(self, cfg, need):
        need(cfg.ssl.ssl_lambda >= 0, f"--ssl_lambda must be >= 0, got {cfg.ssl.ssl_lambda}")

    def describe(self, config):
        return {"criteria": "group norm", "schedule": f"group lasso {config.get('ssl_lambda')}"}

    def penalty(self, cfg):
        return Penalty(regularizers.group_lasso(cfg.ssl.ssl_lambda))

    def targets(self, cfg, net, alive, alive_s):
        return channel_groups(net, alive)

    def next_masks(self, ticket, scoring):
        norms = channel_norms(ticket.masks, ticket.params, ticket.targets)
        return masks_lib.remove_channels(ticket.masks, norms,
                                         ticket.cfg.prune.rate_at(ticket.round)), None

    def epoch_values(self, ticket, metrics):
        return {"group_norm_sum": float(regularizers.group_norms(ticket.params,
                                                                 ticket.targets).sum())}


__all__ = ["SSL", "SSLConfig", "channel_groups", "channel_bases", "channel_norms"]
