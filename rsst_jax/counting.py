"""Counting parameters, multiply-accumulates (MACs) and FLOPs of dense, masked and compact networks.

One place for the numbers ``experiments.analyze``, ``experiments.compact`` and
``experiments.bench`` report:

- ``count_params``: scalars in a parameter tree; ``count_kept_params``: those a mask keeps.
- ``count_flops``: MACs of convs and dense layers for one image, from the shapes the
  network computes (``H' W' kh kw (C_in/groups) C_out`` per conv, ``C_in C_out`` per dense
  layer); FLOPs = 2 * MACs; BatchNorm, activations, adds and pooling are not counted.
- ``compact_stats``: both for the dense, masked and compacted (``rsst_jax.compact``) ticket.
- ``layerwise_compact_params``: a graph-free upper bound for networks compaction cannot follow.
- ``xla_flops``: XLA's own count for a compiled program (every floating-point op of one
  call, whole batch, forward and backward if the program has them) -- a different quantity.

Nothing here prints or touches files.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from rsst_jax import masks as masks_lib
from rsst_jax.compact import compact
from rsst_jax.model_masks import module_calls

__all__ = ["count_params", "count_kept_params", "kernel_masks", "count_pruned_channels",
           "layerwise_compact_params", "count_flops", "compact_stats", "xla_flops"]

PyTree = Any


def count_params(params: PyTree) -> int:
    """Number of scalars in the array leaves of ``params`` (None leaves count 0)."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def count_kept_params(params: PyTree, masks: PyTree) -> int:
    """``count_params(params)`` less the entries every mask leaf prunes (kernel and, if
    merged in, BatchNorm masks alike)."""
    pruned = sum(int(np.size(m) - np.sum(np.asarray(m)))
                 for m in jax.tree_util.tree_leaves(masks))
    return count_params(params) - pruned


def kernel_masks(masks: PyTree) -> list:
    """The masks of conv/dense kernels (leaves named ``kernel`` with 2+ axes), in
    ``masks_lib.flat_dict`` order; BatchNorm masks merged in by ``bn_masks`` are left out."""
    return [m for p, m in masks_lib.flat_dict(masks).items()
            if m is not None and p.endswith("kernel") and np.ndim(m) >= 2]


def count_pruned_channels(masks: PyTree) -> int:
    """Output channels (last axis) of kernel masks with no kept entry."""
    return sum(int((~np.asarray(m).reshape(-1, np.shape(m)[-1]).any(axis=0)).sum())
               for m in kernel_masks(masks))


def layerwise_compact_params(params: PyTree, masks: PyTree) -> int:
    """Parameters if pruned channels were removed, counted per layer without the graph:
    (output channels with a kept weight) x (input channels with a kept weight) x kh x kw
    for every masked kernel; everything else counted whole. An upper bound: it does not
    see that a removed channel also empties the next layer's input."""
    compact_params = 0
    mflat = masks_lib.flat_dict(masks)
    for path, w in masks_lib.flat_dict(params).items():
        m = mflat.get(path)
        if m is None or np.ndim(m) < 2:
            compact_params += int(np.size(w))
            continue
        m = np.asarray(m)
        alive_out = int(np.any(m.reshape(-1, m.shape[-1]), axis=0).sum())
        alive_in = int(np.any(np.moveaxis(m, -2, 0).reshape(m.shape[-2], -1), axis=1).sum())
        compact_params += alive_out * alive_in * int(np.prod(m.shape[:-2]))
    return compact_params


def _kernel_path(module_path: str) -> str:
    return f"{module_path}/kernel" if module_path else "kernel"


def _layer_positions(model, variables, sample_shape) -> dict[str, tuple[int, tuple]]:
    """Module path -> (output positions per image, kernel shape) for modules with a kernel."""
    flat = masks_lib.flat_dict(variables.get("params", {}))
    out: dict[str, tuple[int, tuple]] = {}
    for c in module_calls(model, sample_shape, variables)[0]:
        kernel = flat.get(_kernel_path(c.path))
        if kernel is None or not hasattr(c.output, "shape"):
            continue
        prev = out.get(c.path, (0, None))[0]
        out[c.path] = (prev + math.prod(c.output.shape[1:-1]), tuple(np.shape(kernel)))
    return out


def count_flops(model: nn.Module, variables: dict, sample_shape: Sequence[int],
                masks: PyTree = None) -> dict:
    """Multiply-accumulates of every module with a ``kernel`` (convs, dense) for one image.

    A layer's MACs are (output positions) x (kernel size): ``H' W' kh kw (C_in/groups)
    C_out`` for a conv, ``C_in C_out`` for a dense layer. BatchNorm, activations, residual
    adds and pooling are not counted. Returns ``{'macs', 'flops' (= 2 * macs), 'layers':
    {module path: macs}}``; with ``masks``, also ``masked_macs``/``masked_flops`` counting
    only kept weights (what unstructured sparsity could save at best). Shapes only:
    ``variables`` may be abstract. ``sample_shape`` is ``(H, W, C)``.
    """
    positions = _layer_positions(model, variables, sample_shape)
    layers = {path: n * math.prod(k) for path, (n, k) in positions.items()}
    macs = int(sum(layers.values()))
    result = {"macs": macs, "flops": 2 * macs, "layers": layers}
    if masks is not None:
        mflat = masks_lib.flat_dict(masks)
        masked = 0
        for path, (n, k) in positions.items():
            m = mflat.get(_kernel_path(path))
            masked += n * (math.prod(k) if m is None else int(np.sum(np.asarray(m))))
        result.update(masked_macs=masked, masked_flops=2 * masked)
    return result


def compact_stats(model: nn.Module, variables: dict, masks: PyTree, sample_shape: Sequence[int],
                  *, approximate: bool = False, round_to: int = 1) -> dict:
    """Parameters and FLOPs of a ticket: dense, masked (kept weights) and compacted.

    Keys: ``params``, ``macs``, ``flops`` (dense network), ``masked_params`` (weights kept
    by the masks), ``masked_macs``/``masked_flops``, ``compact_params``, ``compact_macs``,
    ``compact_flops``, ``param_ratio``/``flop_ratio`` (compact / dense), ``channels``/
    ``channels_kept`` (output channels of masked kernels, after compaction),
    ``channel_sparsity`` (fraction of masked kernels' output channels fully pruned),
    ``pruned_channels_kept`` (pruned but not removable, e.g. BatchNorm not zeroed),
    ``exact`` (False when ``approximate`` removed such channels). FLOPs = 2 * MACs.
    """
    cmodel, cvars, desc = compact(model, variables, masks, approximate=approximate,
                                  sample_shape=sample_shape, round_to=round_to)
    dense = count_flops(model, variables, sample_shape, masks)
    small = count_flops(cmodel, cvars, sample_shape)
    params = count_params(variables["params"])
    compact_params = count_params(cvars["params"])
    return {
        "params": params, "macs": dense["macs"], "flops": dense["flops"],
        "masked_params": count_kept_params(variables["params"], masks),
        "masked_macs": dense["masked_macs"], "masked_flops": dense["masked_flops"],
        "compact_params": compact_params, "compact_macs": small["macs"],
        "compact_flops": small["flops"],
        "param_ratio": compact_params / params if params else 1.0,
        "flop_ratio": small["macs"] / dense["macs"] if dense["macs"] else 1.0,
        "channels": desc["prunable_channels"], "channels_kept": desc["prunable_channels_kept"],
        "channel_sparsity": masks_lib.channel_sparsity(kernel_masks(masks)),
        "pruned_channels_kept": desc["pruned_channels_kept"],
        "pruned_channels_kept_why": desc["pruned_channels_kept_why"], "exact": desc["exact"],
    }


def xla_flops(compiled) -> Optional[float]:
    """XLA's count of floating-point operations of one call of a compiled program
    (``jax.jit(f).lower(...).compile()``), or None if the backend does not report it."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    value = (cost or {}).get("flops")
    return float(value) if value and value > 0 else None
