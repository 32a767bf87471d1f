"""Compaction: turn a channel-sparse ticket into a physically narrower network.

A masked network computes as many multiply-adds as the dense one; ``compact`` removes the
pruned channels for real and returns a network of the same family with per-layer widths.
The package exports the function: ``rsst_jax.compact(net, variables, masks)``; this
module also holds ``model_from_description`` (reads back ``compact``'s description).

How, without knowing any layer names:

1. **Channel flow and decision** (``rsst_jax.channel_flow``): ``model.apply`` is traced
   once to a jaxpr and followed channel by channel; a group of channels goes when it is
   exactly zero for every input or nothing reads it (``approximate``: also when only a
   BatchNorm constant is left), keeping ``round_to``-aligned widths.
2. **Rebuild.** Each variable is sliced along the axes the flow recorded; the narrower
   module comes from the family's rebuilder (``rsst_jax.nets.register_rebuild``, beside
   each network in ``rsst_jax/nets/``), which reads the compact kernel shapes. Option-A
   ResNets get explicit shortcut channel maps, so residual-stream channels are removed
   there too.

Parameters and FLOPs of the result: ``rsst_jax.counting``. Equivalence holds in eval mode
(running statistics); nothing here prints or touches files.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import unflatten_dict

from rsst_jax import masks as masks_lib
from rsst_jax import nets
from rsst_jax.channel_flow import channel_flow, decide_removal, zero_responses
from rsst_jax.masks import _is_none

__all__ = ["compact", "model_from_description"]

PyTree = Any


def _like(params: PyTree, values: dict[str, Any]) -> PyTree:
    """A tree with the structure of ``params``: ``values[path]`` where given, None elsewhere."""
    treedef = jax.tree_util.tree_structure(params, is_leaf=_is_none)
    return jax.tree_util.tree_unflatten(treedef,
                                        [values.get(p) for p in masks_lib.tree_paths(params)])


# --------------------------------------------------------------------------- description

def _attributes(model: nn.Module) -> dict:
    def enc(v):
        if isinstance(v, (tuple, list)):
            return [enc(x) for x in v]
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        return {"dtype": jnp.dtype(v).name}
    return {f.name: enc(getattr(model, f.name)) for f in dataclasses.fields(model)
            if f.name not in ("parent", "name")}


def model_from_description(description: dict) -> nn.Module:
    """The compact module described by ``compact``'s arch description (e.g. read back from
    ``architecture.json``)."""
    families = nets.rebuild_families()
    family = description.get("family")
    if family not in families:
        raise ValueError(f"unknown network family {family!r}; known: {', '.join(sorted(families))}")

    def dec(v):
        if isinstance(v, list):
            return tuple(dec(x) for x in v)
        if isinstance(v, dict) and set(v) == {"dtype"}:
            return jnp.dtype(v["dtype"])
        return v
    return families[family](**{k: dec(v) for k, v in description["attributes"].items()})


# --------------------------------------------------------------------------- compact

def _default_sample_shape(params: PyTree) -> tuple:
    stem = masks_lib.stem_path(params)
    if stem is None:
        raise ValueError("pass sample_shape: the network has no conv kernel to infer it from")
    return (32, 32, int(np.shape(masks_lib.flat_dict(params)[stem])[-2]))


def compact(net_name_or_model, variables: dict, masks: PyTree, *, num_classes: Optional[int] = None,
            approximate: bool = False, sample_shape: Optional[Sequence[int]] = None,
            net_kwargs: Optional[dict] = None, round_to: int = 1) -> tuple[nn.Module, dict, dict]:
    """Physically remove the pruned channels of a ticket.

    Args:
      net_name_or_model: a registered arch name (then ``num_classes`` and optional
        ``net_kwargs`` build it) or the Flax module itself.
      variables: ``{'params': ..., 'batch_stats': ...}`` of the masked network.
      masks: a weight mask tree (or one merged with ``model_masks.bn_masks``); applied to
        ``params``.
      approximate: also remove pruned channels whose BatchNorm still adds a constant
        (not exact: measure the error against the masked network).
      sample_shape: one image's ``(H, W, C)``; default ``(32, 32, C_in of the stem)``.
      round_to: keep some removable channels so that widths are multiples of this where
        possible (e.g. 8: XLA's CPU convolutions are much slower on other widths); the
        kept extra channels are zero or unread, so this never changes the result.

    Returns:
      ``(compact_model, compact_variables, description)``. In eval mode the compact
      network's logits equal those of ``model_masks.masked_variables(variables, masks)``
      up to float rounding (unless approximate removals happened: ``description['exact']``).
      ``description`` is JSON-able: family, arch, module attributes (per-layer widths),
      per conv/dense kernel its in/out widths and kept output channels (original indices),
      channel totals and the ops the channel analysis could not follow.
    """
    if isinstance(net_name_or_model, str):
        if num_classes is None:
            raise ValueError("compact(arch_name, ...) needs num_classes")
        model = nets.get_net(net_name_or_model, num_classes, **(net_kwargs or {}))
        arch = net_name_or_model
    else:
        model, arch = net_name_or_model, None
    rebuild = nets.get_rebuild(model)
    params = variables["params"]
    masks_lib.check_masks(params, masks)
    sample_shape = (tuple(sample_shape) if sample_shape is not None
                    else _default_sample_shape(params))
    mflat = masks_lib.flat_dict(masks)
    masked = jax.tree_util.tree_map(np.asarray, dict(variables))
    masked["params"] = _like(params, {p: np.where(np.asarray(mflat[p]), w, np.zeros_like(w))
                                      if mflat[p] is not None else w
                                      for p, w in masks_lib.flat_dict(masked["params"]).items()})

    flow, calls = channel_flow(model, masked, sample_shape)
    flat_vars = masks_lib.flat_dict(masked)
    shapes = {p: tuple(np.shape(x)) for p, x in flat_vars.items()}
    kernel_masks = {f"params/{p}": m for p, m in mflat.items() if m is not None}
    responses = zero_responses(calls, masked, {m for m, _ in flow.modules})
    plan = decide_removal(flow, kernel_masks, shapes, responses, approximate, round_to)

    compact_flat = {}
    for path, leaf in flat_vars.items():
        arr = np.asarray(leaf)
        for axis, kept in plan.keep.get(path, {}).items():
            if not kept.all():
                arr = np.compress(kept, arr, axis=axis)
        compact_flat[path] = jnp.asarray(arr)
    compact_vars = unflatten_dict({tuple(p.split("/")): v for p, v in compact_flat.items()})
    new_shapes = {p: tuple(v.shape) for p, v in compact_flat.items()}
    compact_model = rebuild(model, new_shapes, plan.keep)

    # The rebuilt module must create exactly the sliced variables.
    init = jax.eval_shape(lambda x: compact_model.init(jax.random.PRNGKey(0), x, train=False),
                          jax.ShapeDtypeStruct((1, *sample_shape), jnp.float32))
    got = {p: tuple(x.shape) for p, x in masks_lib.flat_dict(init).items()}
    if got != new_shapes:
        bad = sorted(p for p in set(got) | set(new_shapes) if got.get(p) != new_shapes.get(p))
        raise RuntimeError(f"rebuilt {type(model).__name__} does not match the compacted "
                           f"variables at {bad[0]}: {got.get(bad[0])} vs {new_shapes.get(bad[0])}")

    layers, total, kept_total = {}, 0, 0
    for leaf, layer in flow.layers.items():
        out_axis = 1 if layer.kind == "dense" else 3
        k = plan.keep[leaf][out_axis]
        layers[leaf[len("params/"):-len("/kernel")]] = {
            "kind": layer.kind, "in": int(new_shapes[leaf][-2] if layer.kind != "depthwise"
                                          else new_shapes[leaf][-1]),
            "out": int(k.sum()), "out_original": int(k.size),
            "kept": [int(i) for i in np.flatnonzero(k)] if not k.all() else "all"}
        if kernel_masks.get(leaf) is not None:
            total, kept_total = total + k.size, kept_total + int(k.sum())
    description = {
        "arch": arch, "family": type(model).__name__,
        "num_classes": (num_classes if num_classes is not None
                        else getattr(model, "num_classes", None)),
        "sample_shape": list(sample_shape), "attributes": _attributes(compact_model),
        "layers": layers, "approximate": bool(approximate), "exact": plan.approx_only == 0,
        "round_to": int(round_to),
        "prunable_channels": total, "prunable_channels_kept": kept_total,
        "approximate_channels": plan.approx_only, "pruned_channels_kept": plan.dead_kept,
        "pruned_channels_kept_why": plan.dead_kept_reasons,
        "unfollowed_ops": sorted(set(flow.opaque)),
    }
    return compact_model, compact_vars, description
