"""Dependency-graph group pruning (``--struct group``): Fang, Ma, Song, Mi and Wang,
"DepGraph: Towards Any Structural Pruning", CVPR 2023 (its library is Torch-Pruning).

DepGraph finds the parameters that must be pruned together, because they meet in a
residual addition, a concatenation or a per-channel layer, scores each such group by the
norm of all of its parameters, and removes whole groups, so that every pruned channel
really leaves the network. Here the dependency graph is the channel-flow graph that
compaction builds (``rsst_jax.channel_flow``: one trace of the network, no layer names):
a *unit* is a set of output channels of prunable layers that carry one channel of the
network (one channel of a plain layer, or one channel of a residual stream with every
layer writing into it). After each round a unit's importance is the mean, over the
variables it touches (the writers' kernel slices, the readers' input slices, the
BatchNorm entries), of their squared L2 norm, divided by the mean importance of the units
of its coupled layers (Torch-Pruning's default, ``GroupMagnitudeImportance`` with mean
reduction and mean normalization); ``--rate`` of the live units with the lowest
importance over the network are removed, all of their channels at once
(``masks.remove_units``), and the next round trains the rewound weights of the rest.

Choices the procedure forces, or the paper leaves:
- A unit one of whose writers is not prunable (the stem convolution without --conv1) or
  that reaches the network's output stays: removing it would leave live values behind.
- Units are ranked over the whole network at ``--rate`` of the live units per round (the
  paper's global pruning with a ratio), at least one channel staying in every layer.
- DepGraph's optional group-level sparse training is not part of this method: this is
  its group pruning, repeated each round of the lottery-ticket procedure.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from rsst_jax import channel_flow
from rsst_jax import masks as masks_lib
from rsst_jax import trees
from rsst_jax.methods.base import Method
from rsst_jax.methods.registry import register_method
from rsst_jax.metrics import ROUND_ROW, Metric

_PARAMS = "params/"


def coupled_units(net, variables, masks) -> list[tuple[float, list[tuple[str, int]]]]:
    """The removable units of the network with their normalized importance:
    [(importance, [(kernel path, channel), ...])], in the order the graph numbers them."""
    flow, _ = channel_flow.channel_flow(net.model, variables, net.image_shape)
    find = flow.find
    pinned = {find(n) for n in flow.pinned}
    prunable = {_PARAMS + p for p, m in trees.items(masks) if m is not None}
    writers: dict[int, list] = defaultdict(list)
    for node in sorted(flow.writer):
        writers[find(node)].append(flow.writer[node])
    flat = trees.flat_dict(variables)
    touched: dict[int, dict] = defaultdict(lambda: defaultdict(float))  # unit -> leaf -> |w|^2
    for leaf, axes in flow.axes.items():
        if not leaf.startswith(_PARAMS):
            continue
        sq = np.square(np.asarray(flat[leaf], np.float64))
        for axis, labels in axes.items():
            per = sq.sum(axis=tuple(a for a in range(sq.ndim) if a != axis))
            for pos, lab in enumerate(labels):
                if lab != channel_flow.ZERO:
                    touched[find(int(lab))][leaf] += float(per[pos])
    live = masks_lib.live_channels(masks)
    units, coupled = [], []
    for root, ws in writers.items():
        if root in pinned or not all(w in prunable for w, _ in ws):
            continue
        members = [(w[len(_PARAMS):], int(c)) for w, c in ws]
        values = touched[root].values()
        units.append((float(np.mean(list(values))) if values else 0.0, members))
        coupled.append(frozenset(p for p, _ in members))
    means: dict[frozenset, list] = defaultdict(list)
    for (imp, members), layers in zip(units, coupled):
        if any(live[p][c] for p, c in members):
            means[layers].append(imp)
    return [(imp / (np.mean(means[layers]) or 1.0) if means[layers] else imp, members)
            for (imp, members), layers in zip(units, coupled)]


@register_method
class Group(Method):
    name = "group"
    title = "DepGraph"
    summary = ("channels coupled through residual additions scored by their group norm and "
               "removed together")
    paper = "Fang et al., DepGraph: Towards Any Structural Pruning, CVPR 2023"
    channels = True
    metrics = (Metric("units_removable", "channel units the graph lets go", per=ROUND_ROW,
                      plot=False),)
    markers = {"DepGraph": "h"}

    def describe(self, config):
        return {"criteria": "group L2 norm", "schedule": "-"}

    def next_masks(self, ticket, scoring):
        units = coupled_units(ticket.net, ticket.variables, ticket.masks)
        live = masks_lib.live_channels(ticket.masks)
        count = sum(any(live[p][c] for p, c in members) for _, members in units)
        rate = ticket.cfg.prune.rate_at(ticket.round)
        return masks_lib.remove_units(ticket.masks, units, int(round(rate * count))), None

    def round_values(self, ticket, row):
        units = coupled_units(ticket.net, ticket.variables, ticket.masks)
        live = masks_lib.live_channels(ticket.masks)
        return {"units_removable": sum(any(live[p][c] for p, c in m) for _, m in units)}


__all__ = ["Group", "coupled_units"]
