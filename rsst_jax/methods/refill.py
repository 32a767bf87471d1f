"""Refill (``--struct refill``; docs/SPEC.md section 2): IMP's magnitude prune made
channel-wise.

After each round: IMP's prune of the trained weights, then every prunable layer keeps
whole output channels: as many as the prune left weights for, the best by ``--criteria``
(scored on the trained weights from before the prune, as the reference), and
``--fillback_rate`` of the pruned ones given back (Refill+). The next round trains
those channels; the train step adds nothing.
"""
from __future__ import annotations

from rsst_jax import masks as masks_lib
from rsst_jax import rounds
from rsst_jax.methods.base import Method
from rsst_jax.methods.imp import prune_weights
from rsst_jax.methods.registry import register_method


def refilled(ticket, scoring):
    """(the IMP-pruned masks, their channel-wise refill by ``--criteria``) of a trained
    ticket (``TicketValues``)."""
    prune_cfg = ticket.cfg.prune
    pruned = prune_weights(ticket.params, ticket.masks, prune_cfg, ticket.round, scoring.key)
    batches, crit_key = scoring.batches()
    scores = rounds.score_channels(ticket.net, ticket.variables, ticket.masks, pruned,
                                   prune_cfg, batches, key=crit_key, mean=scoring.mean,
                                   std=scoring.std)
    return pruned, masks_lib.refill(pruned, scores, prune_cfg.fillback_rate)


@register_method
class Refill(Method):
    name = "refill"
    title = "Refill"
    summary = "IMP's prune made channel-wise: whole channels chosen by --criteria"
    channels = True
    markers = {"Refill": "s", "Refill+": "D"}
    paper = ("Chen et al., Coarsening the Granularity: Towards Structurally Sparse Lottery "
             "Tickets, ICML 2022")

    def label(self, config: dict) -> str:
        return "Refill+" if float(config.get("fillback_rate") or 0) > 0 else self.title

    def next_masks(self, ticket, scoring):
        return refilled(ticket, scoring)[1], None


__all__ = ["Refill", "refilled"]
