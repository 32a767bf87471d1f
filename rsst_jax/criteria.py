"""Channel scores for Refill/RSST (docs/SPEC.md section 3), in a registry of criteria.

`channel_scores(criterion, apply_fn, variables, masks, batch)` returns a pytree with the
structure of `variables['params']`: a float32 `[C]` array per prunable leaf (where
`masks` is not None; `C` = the kernel's last axis, the output channels) and None
elsewhere. Every score is computed on the masked weights (pruned entries are 0).

Activation-based criteria (`l1`, `l2`, `saliency`) read each prunable kernel's own
output: the module whose parameters hold the kernel (module path = the kernel's path
without its last name) is intercepted with `flax.linen.intercept_methods` while the
model runs, so no layer is found by a model-specific name. Each layer's score comes
from its own output, summed per channel (last axis), never from another layer's
(docs/SPEC.md section 8).

A criterion is one decorated function::

    @register_criterion("my_score")
    def my_score(ctx: ScoringContext, x, y, key) -> dict[tuple[str, ...], jax.Array]:
        _, outputs = ctx.layer_outputs(x)
        # outputs[path]: the owning module's output at each of its calls, [..., C].
        return {path: sum(per_channel_sum(a**4) for a in outs) for path, outs in outputs.items()}

It returns `{kernel path: [C] scores}` for one batch; scores are summed over the
`num_batches` batches. `register_criterion(name, per_batch=False)` declares a
criterion that does not read data: it is called once with `x = y = key = None`.
"""
from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from rsst_jax import model_masks, trees
from rsst_jax.losses import cross_entropy  # the training loss; saliency and hessian read it

Path = tuple[str, ...]
CriterionFn = Callable[..., Mapping[Path, jax.Array]]


class Criterion(NamedTuple):
    fn: CriterionFn
    per_batch: bool


_CRITERIA: dict[str, Criterion] = {}


def registered_module(name: str):
    """The module whose function is registered as criterion ``name`` (None if unknown)."""
    c = _CRITERIA.get(name)
    return None if c is None else getattr(c.fn, "__module__", None)


def register_criterion(name: str, *, per_batch: bool = True) -> Callable[[CriterionFn], CriterionFn]:
    """Decorator adding `fn(ctx, x, y, key) -> {kernel path: [C] scores}` as criterion `name`.

    `per_batch=True`: called once per batch (under jit) and summed over batches.
    `per_batch=False`: data-free, called once with `x = y = key = None`.
    """

    def decorate(fn: CriterionFn) -> CriterionFn:
        if name in _CRITERIA:
            raise ValueError(f"criterion {name!r} is already registered")
        _CRITERIA[name] = Criterion(fn, per_batch)
        return fn

    return decorate


def available_criteria() -> tuple[str, ...]:
    return tuple(sorted(_CRITERIA))


def get_criterion(name: str) -> Criterion:
    if name not in _CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; choose one of {', '.join(available_criteria())}")
    return _CRITERIA[name]


_path_tuple = trees.path_tuple


def flat_masks(masks: Any) -> dict[Path, jax.Array]:
    """`{param path: bool mask}` for every prunable leaf (None leaves are empty subtrees)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(masks)
    return {_path_tuple(p): m for p, m in leaves}


def _replace_leaves(tree: Any, new: Mapping[Path, jax.Array]) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, x: new.get(_path_tuple(p), x), tree)


def per_channel_sum(a: jax.Array) -> jax.Array:
    """`[..., C] -> [C]`: sum over every axis but the last (batch, space, fan-in)."""
    return jnp.sum(a.reshape(-1, a.shape[-1]).astype(jnp.float32), axis=0)


# ---------------------------------------------------------------------------------------
# What a criterion sees.


class ScoringContext:
    """The masked model, as seen by a criterion (built inside the compiled per-batch step).

    Attributes:
      apply_fn: `apply_fn(variables, x, train=False) -> logits`.
      variables: the variables with masked params (pruned entries are exactly 0).
      masks: `{kernel path: bool mask}` of the prunable leaves (what `remain` counts).
      kernels: `{kernel path: kernel}` as scored: the kernel under the kernel masks
        (by default `masks`; a run passes the masks before the round's prune, so the
        criteria see the trained weights as the reference does).
      hessian_samples: Rademacher probes for Hutchinson estimates.

    Methods: ``logits(x, kernels)`` (the network with other kernels), ``layer_outputs(x)``
    (each prunable layer's own output), ``batchnorm_after(x)`` (which BatchNorm
    normalizes each kernel's output, to read its ``scale`` and ``bias`` in
    ``variables['params']`` and its statistics in ``variables['batch_stats']``).
    """

    def __init__(self, apply_fn, variables, masks: Mapping[Path, jax.Array], hessian_samples: int,
                 kernel_masks: Mapping[Path, jax.Array] | None = None):
        self.apply_fn = apply_fn
        self.masks = dict(masks)
        self.hessian_samples = hessian_samples
        params = variables["params"]
        self.kernel_masks = self.masks if kernel_masks is None else dict(kernel_masks)
        self.kernels = {p: _masked(_get(params, p), self.kernel_masks[p]) for p in self.masks}
        self.variables = {**variables, "params": _replace_leaves(params, self.kernels)}

    def logits(self, x: jax.Array, kernels: Mapping[Path, jax.Array] | None = None) -> jax.Array:
        """Logits with the given (unmasked) kernels, masked here, replacing the prunable ones."""
        variables = self.variables
        if kernels is not None:
            masked = {p: _masked(k, self.kernel_masks[p]) for p, k in kernels.items()}
            variables = {**variables, "params": _replace_leaves(variables["params"], masked)}
        return self.apply_fn(variables, x, train=False)

    def layer_outputs(self, x: jax.Array, perturbations: Mapping[Path, list[jax.Array]] | None = None):
        """Run the model, capturing the output of the module owning each prunable kernel.

        Returns `(logits, {kernel path: [output of each call, shape [..., C]]})`.
        `perturbations[path][i]` is added to that module's i-th output (gradients w.r.t. it
        are dL/da).
        """
        owners: dict[Path, list[Path]] = {}
        for p in self.masks:
            owners.setdefault(p[:-1], []).append(p)
        captured: dict[Path, list[jax.Array]] = {mp: [] for mp in owners}

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name != "__call__":
                return out
            module_path = tuple(context.module.path)
            if module_path not in captured:
                return out
            calls = captured[module_path]
            if perturbations is not None:
                # Every kernel of this module gets the same perturbation, hence the same dL/da.
                out = out + sum(perturbations[p][len(calls)] for p in owners[module_path])
            calls.append(out)
            return out

        with nn.intercept_methods(interceptor):
            logits = self.apply_fn(self.variables, x, train=False)

        outputs = {}
        for module_path, paths in owners.items():
            calls = captured[module_path]
            for p in paths:
                c = self.masks[p].shape[-1]
                if not calls:
                    where = "/".join(module_path)
                    raise ValueError(f"the module at {where} owning kernel {'/'.join(p)} was never called")
                for out in calls:
                    if out.shape[-1] != c:
                        where = "/".join(module_path)
                        raise ValueError(f"output of {where} has {out.shape[-1]} channels, kernel has {c}")
                outputs[p] = calls
        return logits, outputs


    def batchnorm_after(self, x: jax.Array) -> dict[Path, Path]:
        """``{kernel path: module path of the BatchNorm applied to its output}`` for the
        prunable kernels a BatchNorm follows directly, found by running the network
        abstractly on one image of ``x``'s shape (``model_masks.conv_bn_pairs``: by the
        arrays passed between calls, never by names). Needs ``apply_fn = model.apply``."""
        model = getattr(self.apply_fn, "__self__", None)
        if not isinstance(model, nn.Module):
            raise ValueError("batchnorm_after needs the scores computed with apply_fn = "
                             "model.apply of a flax Module")
        pairs = dict(model_masks.conv_bn_pairs(model, tuple(x.shape[1:])))
        return {p: tuple(pairs[conv].split("/")) for p in self.masks
                if (conv := "/".join(map(str, p[:-1]))) in pairs}


def _get(tree: Any, path: Path) -> Any:
    for k in path:
        try:
            tree = tree[k]
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"mask path {'/'.join(map(str, path))} is not a leaf of params") from e
    return tree


def _masked(w: jax.Array, m: jax.Array) -> jax.Array:
    return jnp.where(m, w, jnp.zeros_like(w))


# ---------------------------------------------------------------------------------------
# Entry point.


def _batches(batch: Any, num_batches: int) -> list[tuple[Any, Any]]:
    if isinstance(batch, tuple) and len(batch) == 2 and hasattr(batch[0], "shape"):
        return [batch]
    out = list(itertools.islice(iter(batch), num_batches))
    if not out:
        raise ValueError("no batch to score on")
    return out


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _score_step(fn, apply_fn, hessian_samples, variables, fmasks, kmasks, x, y, key):
    """One batch's scores, compiled once per (criterion, apply_fn, hessian_samples, shapes)."""
    ctx = ScoringContext(apply_fn, variables, fmasks, hessian_samples, kmasks)
    return {p: jnp.asarray(s, jnp.float32) for p, s in fn(ctx, x, y, key).items()}


def channel_scores(
    criterion: str,
    apply_fn: Callable[..., jax.Array],
    variables: Mapping[str, Any],
    masks: Any,
    batch: Any,
    *,
    key: jax.Array | None = None,
    num_batches: int = 1,
    hessian_samples: int = 8,
    kernel_masks: Any = None,
) -> Any:
    """Per-output-channel scores of every prunable kernel under criterion `criterion`.

    Args:
      criterion: a name from `available_criteria()`.
      apply_fn: `apply_fn(variables, x, train=False) -> logits [N, classes]` (eval mode).
      variables: `{'params': ..., 'batch_stats': ...}`.
      masks: pytree like params: bool kernel mask (True = kept) or None.
      batch: `(x, y)` with `x` float32 NHWC (normalized) and `y` int labels `[N]`, or an
        iterable of such pairs; the first `num_batches` are used and scores summed.
      key: PRNG key (needed by `hessian`); split over the batches.
      hessian_samples: Rademacher probes per batch for `hessian`.
      kernel_masks: masks applied to the kernels that are scored (default `masks`);
        `remain` always counts `masks`. docs/SPEC.md section 3: the trained weights as
        they were before the round's prune (pass that round's masks here), with the new
        mask in `masks`.

    Returns:
      Pytree with the structure of `variables['params']`: float32 `[C]` per prunable leaf,
      None elsewhere.
    """
    crit = get_criterion(criterion)
    fmasks = {p: jnp.asarray(m, dtype=bool) for p, m in flat_masks(masks).items()}
    kmasks = fmasks if kernel_masks is None else {
        p: jnp.asarray(m, dtype=bool) for p, m in flat_masks(kernel_masks).items()}
    try:
        hash(apply_fn)
        step = functools.partial(_score_step, crit.fn, apply_fn, hessian_samples)
    except TypeError:  # an unhashable apply_fn cannot be a static argument: compile per call
        step = jax.jit(functools.partial(_score_step.__wrapped__, crit.fn, apply_fn, hessian_samples))
    if crit.per_batch:
        pairs = _batches(batch, num_batches)
        keys = [None] * len(pairs) if key is None else list(jax.random.split(key, len(pairs)))
        total: dict[Path, jax.Array] = {}
        for (x, y), k in zip(pairs, keys):
            s = step(variables, fmasks, kmasks, jnp.asarray(x), jnp.asarray(y), k)
            total = s if not total else {p: total[p] + s[p] for p in total}
    else:
        total = step(variables, fmasks, kmasks, None, None, None)

    for p, m in fmasks.items():
        if p not in total or total[p].shape != (m.shape[-1],):
            got = total[p].shape if p in total else "nothing"
            raise ValueError(f"criterion {criterion!r} gave {got} for {'/'.join(p)}, expected ({m.shape[-1]},)")
    return jax.tree_util.tree_map_with_path(lambda p, _: total.get(_path_tuple(p)), variables["params"])


# ---------------------------------------------------------------------------------------
# The criteria of docs/SPEC.md section 3.


@register_criterion("remain", per_batch=False)
def remain(ctx: ScoringContext, x, y, key):
    """Number of surviving weights of each channel under the mask."""
    return {p: per_channel_sum(m) for p, m in ctx.masks.items()}


@register_criterion("magnitude", per_batch=False)
def magnitude(ctx: ScoringContext, x, y, key):
    """Sum of |w| of each channel of the masked kernel."""
    return {p: per_channel_sum(jnp.abs(k)) for p, k in ctx.kernels.items()}


@register_criterion("l1")
def l1(ctx: ScoringContext, x, y, key):
    """Sum over batch and space of |a|, a = the layer's own output channel."""
    _, outputs = ctx.layer_outputs(x)
    return {p: sum(per_channel_sum(jnp.abs(a)) for a in outs) for p, outs in outputs.items()}


@register_criterion("l2")
def l2(ctx: ScoringContext, x, y, key):
    """Sum over batch and space of a^2, a = the layer's own output channel."""
    _, outputs = ctx.layer_outputs(x)
    return {p: sum(per_channel_sum(jnp.square(a)) for a in outs) for p, outs in outputs.items()}


@register_criterion("saliency")
def saliency(ctx: ScoringContext, x, y, key):
    """Sum of |a * dL/da| over each output channel (first-order Taylor), L = mean CE."""
    # Shapes of each layer's outputs, to build the zero perturbations dL/da is taken at.
    _, shapes = jax.eval_shape(ctx.layer_outputs, x)
    zeros = {p: [jnp.zeros(s.shape, s.dtype) for s in outs] for p, outs in shapes.items()}

    def loss(perturbations):
        logits, outputs = ctx.layer_outputs(x, perturbations)
        return cross_entropy(logits, y), outputs

    grads, outputs = jax.grad(loss, has_aux=True)(zeros)
    return {
        p: sum(per_channel_sum(jnp.abs(a * g)) for a, g in zip(outs, grads[p]))
        for p, outs in outputs.items()
    }


def hutchinson_diag(f: Callable[[Any], jax.Array], params: Any, key: jax.Array, samples: int) -> Any:
    """Estimate diag of the Hessian of scalar `f` at `params` (a pytree): mean_v v * (H v).

    v are Rademacher probes over all leaves jointly; H v by forward-over-reverse
    (`jax.jvp` of `jax.grad`). Unbiased; the variance of entry i per probe is
    sum_{j != i} H_ij^2.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    grad_f = jax.grad(f)

    def add_probe(i, acc):
        ks = jax.random.split(jax.random.fold_in(key, i), len(leaves))
        v = treedef.unflatten([jax.random.rademacher(k, leaf.shape, leaf.dtype) for k, leaf in zip(ks, leaves)])
        _, hv = jax.jvp(grad_f, (params,), (v,))
        return jax.tree_util.tree_map(lambda a, vi, hvi: a + vi * hvi, acc, v, hv)

    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    total = jax.lax.fori_loop(0, samples, add_probe, zero)
    return jax.tree_util.tree_map(lambda t: t / samples, total)


@register_criterion("hessian")
def hessian(ctx: ScoringContext, x, y, key):
    """Sum over each channel of 0.5 * diag(H)_i * w_i^2, H of the loss w.r.t. the kernels.

    One Hutchinson estimate over all prunable kernels jointly (one H v per probe for the
    whole network), `ctx.hessian_samples` probes per batch.
    """
    if key is None:
        raise ValueError("criterion 'hessian' needs a PRNG key (key=...)")

    # Kernels are re-masked inside, so pruned entries add nothing to H (nor to its variance).
    def loss(kernels):
        return cross_entropy(ctx.logits(x, kernels), y)

    diag = hutchinson_diag(loss, ctx.kernels, key, ctx.hessian_samples)
    return {p: per_channel_sum(0.5 * diag[p] * jnp.square(w)) for p, w in ctx.kernels.items()}
