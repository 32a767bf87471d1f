"""What training needs to know about a model's layers, found by running it, not by names.

One abstract eval forward pass of a single image (``module_calls``) records every
module ``__call__`` with its input and output; from it come the stem (``stem_kernel``)
and which BatchNorm normalizes which conv (``conv_bn_pairs``, by object identity of the
arrays passed between calls). ``bn_masks`` turns a kernel mask into masks for those
BatchNorms, so that a pruned channel is exactly zero after BatchNorm and compaction can
remove it exactly; ``merge_masks`` and ``masked_variables`` combine and apply them.

Nothing here compiles a training program, prints or touches files.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rsst_jax import masks as masks_lib
from rsst_jax.trees import is_none as _is_none

__all__ = ["ModuleCall", "module_calls", "stem_kernel", "conv_bn_pairs", "bn_masks",
           "merge_masks", "masked_variables"]

PyTree = Any


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def _like(params: PyTree, values: dict[str, Any]) -> PyTree:
    """A tree with the structure of ``params``: ``values[path]`` where given, None elsewhere."""
    treedef = jax.tree_util.tree_structure(params, is_leaf=_is_none)
    return jax.tree_util.tree_unflatten(treedef,
                                        [values.get(p) for p in masks_lib.tree_paths(params)])


@dataclasses.dataclass
class ModuleCall:
    """One ``__call__`` of a module during ``module_calls``' forward pass."""
    path: str          # module path, '/'-joined ('' for the top module)
    module: nn.Module  # the bound module
    inputs: Any        # first positional argument (kept alive: identity matters)
    output: Any


def module_calls(model: nn.Module, sample_shape: Sequence[int], variables: PyTree = None
                 ) -> tuple[list[ModuleCall], PyTree]:
    """Every ``__call__`` of a module in one abstract eval forward pass of a single image
    (``sample_shape`` is its ``(H, W, C)``), in call order, and the (abstract) variables:
    ``variables`` if given, else those ``model.init`` makes."""
    calls: list[ModuleCall] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and args:
            calls.append(ModuleCall("/".join(context.module.path), context.module, args[0], out))
        return out

    def run(variables, x):
        with nn.intercept_methods(record):
            if variables is None:
                return model.init(jax.random.PRNGKey(0), x, train=False)
            model.apply(variables, x, train=False)
            return None

    made = jax.eval_shape(run, variables, jax.ShapeDtypeStruct((1, *sample_shape), jnp.float32))
    return calls, variables if made is None else made


def stem_kernel(model: nn.Module, sample_shape: Sequence[int]) -> Optional[str]:
    """Path of the kernel of the first convolution the input meets (the stem), found by
    running the network abstractly, not by names or dict order."""
    calls, _ = module_calls(model, sample_shape)
    for call in calls:
        if isinstance(call.module, nn.Conv):
            return _join(call.path, "kernel")
    return None


def conv_bn_pairs(model: nn.Module, sample_shape: Sequence[int]) -> list[tuple[str, str]]:
    """(conv module path, BatchNorm module path) for every ``nn.BatchNorm`` applied directly
    to the output of a module owning a ``kernel`` parameter, in call order.

    Found in one abstract pass by object identity of the arrays passed between module
    calls, so no layer names are involved.
    """
    calls, variables = module_calls(model, sample_shape)
    owners = {p[:-len("kernel")].rstrip("/") for p in masks_lib.tree_paths(variables["params"])
              if p.rsplit("/", 1)[-1] == "kernel"}
    pairs = []
    for bn in calls:
        if not isinstance(bn.module, nn.BatchNorm):
            continue
        producers = [c.path for c in calls if c.output is bn.inputs and c.path in owners]
        if producers:
            pairs.append((max(producers, key=len), bn.path))  # the innermost producer
    return pairs


def bn_masks(model: nn.Module, params: PyTree, masks: PyTree, sample_shape: Sequence[int]
             ) -> PyTree:
    """Masks for the BatchNorms that follow prunable convs: a pytree like ``params``.

    For each BatchNorm applied directly to a conv whose kernel has a mask, its ``scale``
    and ``bias`` leaves get a ``[C]`` bool array, False where the conv's output channel is
    entirely pruned (``mask[..., c]`` all False); every other leaf is None. The set of
    non-None leaves depends only on the network and on which kernels are prunable, never
    on the mask values, so a merged tree keeps one structure for every round.

    Merged with ``merge_masks`` and given to ``keep_pruned``/``apply_masks``, a removed
    channel's BatchNorm has scale = bias = 0 and stays so, making the channel exactly 0
    after BatchNorm (in train and eval mode) and its removal by ``rsst_jax.compact`` exact.
    Works on traced masks (the pairing uses shapes only). ``sample_shape`` is one image's
    ``(H, W, C)``. Use the merged tree only to apply/freeze weights, not for
    ``density``/``channel_sparsity``/pruning, which expect kernel masks.
    """
    mflat, pflat = masks_lib.flat_dict(masks), masks_lib.flat_dict(params)
    extra = {}
    for conv, bn in conv_bn_pairs(model, sample_shape):
        m = mflat.get(_join(conv, "kernel"))
        if m is None:
            continue
        alive = jnp.any(jnp.reshape(m, (-1, m.shape[-1])), axis=0)
        for leaf in ("scale", "bias"):
            path = _join(bn, leaf)
            if path in pflat and tuple(np.shape(pflat[path])) == tuple(alive.shape):
                extra[path] = alive
    return _like(params, extra)


def merge_masks(masks: PyTree, extra: PyTree) -> PyTree:
    """One mask tree from two with the structure of params: the non-None leaf wins, and
    where both are set, an entry is kept only if both keep it."""
    def pick(a, b):
        if a is None:
            return b
        if b is None:
            return a
        return jnp.logical_and(a, b)
    return jax.tree_util.tree_map(pick, masks, extra, is_leaf=_is_none)


def masked_variables(variables: dict, masks: PyTree) -> dict:
    """``variables`` with ``params`` masked (``apply_masks``); other collections as given."""
    return {**variables, "params": masks_lib.apply_masks(variables["params"], masks)}
