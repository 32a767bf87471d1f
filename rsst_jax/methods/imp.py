"""IMP, iterative magnitude pruning (``--struct none``; docs/SPEC.md section 2).

After each round remove ``--rate`` (``rate_at``) of the remaining prunable weights:
the smallest trained weights (``--prune_method magnitude``, globally or per layer),
random ones (``random``), or whole filters by their L1 norm (``filter``). The next round
trains the rewound weights under the new mask; the train step adds nothing.
"""
from __future__ import annotations

import jax

from rsst_jax import masks as masks_lib
from rsst_jax import rounds
from rsst_jax.methods.base import Method
from rsst_jax.methods.registry import register_method


def prune_weights(params, masks, prune_cfg, round_idx: int, key):
    """The IMP step after round ``round_idx``: remove ``rate_at(round_idx)`` of the
    remaining prunable weights (magnitude of the trained weights, random, or whole
    filters by L1 norm), globally or per layer."""
    rate = prune_cfg.rate_at(round_idx)
    if prune_cfg.prune_method == "magnitude":
        return masks_lib.magnitude_prune(params, masks, rate, scope=prune_cfg.scope,
                                         layer_rates=prune_cfg.layer_rate_map or None)
    if prune_cfg.prune_method == "random":
        k = jax.random.fold_in(jax.random.fold_in(key, rounds.KEY_RANDOM_PRUNE), round_idx)
        return masks_lib.random_prune(k, masks, rate, scope=prune_cfg.scope)
    return masks_lib.filter_prune(params, masks, rate)


@register_method
class IMP(Method):
    name = "none"
    title = "IMP"
    summary = "iterative magnitude pruning: unstructured weight masks"
    markers = {"IMP": "o", "filter": "v", "random": "x"}
    paper = ("Frankle and Carbin, The Lottery Ticket Hypothesis: Finding Sparse, Trainable "
             "Neural Networks, ICLR 2019")

    def label(self, config: dict) -> str:
        """IMP, or the baseline --prune_method (filter, random)."""
        method = config.get("prune_method")
        return method if method in ("filter", "random") else self.title

    def next_masks(self, ticket, scoring):
        return prune_weights(ticket.params, ticket.masks, ticket.cfg.prune, ticket.round,
                             scoring.key), None


__all__ = ["IMP", "prune_weights"]
