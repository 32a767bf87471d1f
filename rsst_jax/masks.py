"""Weight masks as pytrees: which leaves are prunable, how to prune, refill and report.

A **mask** has the structure of ``params``: a prunable leaf maps to a ``bool`` array of
the kernel's shape (True = kept); every other leaf maps to ``None``. Flax kernels put
the output channel on the last axis (conv ``(kh, kw, in, out)``, dense ``(in, out)``).

Conventions shared by every function here:

* Paths are the '/'-joined keys of a leaf, e.g. ``'layer1_0/conv1/kernel'``.
* "Flatten order" is ``jax.tree_util`` order (dict keys sorted). Ties in magnitude
  pruning are broken by the position in the concatenation of the prunable leaves,
  flattened in that order (within a leaf for ``layerwise``): the lower index is removed
  first. ``filter_prune`` removes the lower channel index first; ``refill`` keeps the
  higher score, then the lower channel index.
* A count ``round(rate * n)`` is computed as ``jnp.round(float32(rate) * float32(n))``
  (round half to even, like Python's ``round``) so that it stays traceable when ``n``
  depends on mask contents; a per-layer rate is formed in float64, clipped, then cast.
  ``refill``'s ``k`` instead follows the docs/SPEC.md formula in Python float64 exactly.
* Rates, scopes and ``layer_rates`` are static (Python values); masks, params, scores
  and keys may be traced, so one compiled program serves every mask with the same
  structure. Eager calls run jitted cores, compiled once per structure (and scope).
* Functions returning Python numbers or tables (``density``, ``channel_sparsity``,
  ``report``, ``format_report``) need concrete masks and are not meant for ``jax.jit``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from rsst_jax import trees

__all__ = [
    "tree_paths",
    "map_masked",
    "map_prunable",
    "check_masks",
    "prunable",
    "stem_path",
    "init_masks",
    "flat_dict",
    "apply_masks",
    "magnitude_prune",
    "random_prune",
    "filter_prune",
    "refill",
    "refill_channels",
    "rsst_targets",
    "live_channels",
    "remove_units",
    "remove_channels",
    "density",
    "channel_sparsity",
    "LayerRow",
    "report",
    "format_report",
    "keep_pruned",
    "SCOPES",
]

PyTree = Any
SCOPES = ("global", "layerwise")
PRUNE_METHODS = ("magnitude", "random", "filter")  # magnitude_prune, random_prune, filter_prune


# Path helpers live in rsst_jax.trees (one module of pytree helpers); the short names
# below are this module's own uses of them.
_is_none, _key_str, _join, _items = trees.is_none, trees.key_str, trees.join, trees.items
flat_dict, tree_paths, _insertion_order_items = (trees.flat_dict, trees.tree_paths,
                                                 trees.insertion_order_items)


# ------------------------------------------------------------------------ tree maps


def map_masked(fn: Callable[..., Any], tree: PyTree, masks: PyTree, *rest: PyTree) -> PyTree:
    """``fn(leaf, mask, *rest_leaves)`` on every leaf of ``tree`` whose mask is not None.

    Leaves of ``tree`` with a ``None`` mask are returned unchanged, so the result has
    the structure of ``tree`` (params -> params, masks -> masks). ``rest`` trees have
    the structure of params or of masks.
    """
    return jax.tree_util.tree_map(
        lambda m, x, *r: x if m is None else fn(x, m, *r), masks, tree, *rest, is_leaf=_is_none
    )


def map_prunable(fn: Callable[..., Any], masks: PyTree, *trees: PyTree) -> PyTree:
    """``fn(mask, *leaves)`` where the mask is not None, ``None`` elsewhere.

    The result has the structure of a mask (e.g. channel scores, RSST targets).
    """
    return jax.tree_util.tree_map(
        lambda m, *xs: None if m is None else fn(m, *xs), masks, *trees, is_leaf=_is_none
    )


def _structure_error(what: str, ref_paths: list[str], got_paths: list[str]) -> ValueError:
    got, ref = set(got_paths), set(ref_paths)
    missing = [p for p in ref_paths if p not in got]
    extra = [p for p in got_paths if p not in ref]
    parts = []
    if missing:
        parts.append(f"missing leaves {missing[:5]}")
    if extra:
        parts.append(f"unexpected leaves {extra[:5]}")
    if not parts:
        parts.append("same leaf paths but a different container structure or order")
    return ValueError(f"{what} do not match the structure of params: " + "; ".join(parts))


def check_masks(params: PyTree, masks: PyTree) -> None:
    """Raise ValueError naming the leaf path unless ``masks`` is a mask for ``params``.

    Checks: same structure (``None`` at non-prunable leaves), and every non-None mask
    is a ``bool`` array with the shape of its parameter. Works on tracers (shapes only).
    """
    p_items, m_items = _items(params), _items(masks)
    p_paths, m_paths = [p for p, _ in p_items], [p for p, _ in m_items]
    if p_paths != m_paths or (
        jax.tree_util.tree_structure(params, is_leaf=_is_none)
        != jax.tree_util.tree_structure(masks, is_leaf=_is_none)
    ):
        raise _structure_error("masks", p_paths, m_paths)
    for (path, leaf), (_, m) in zip(p_items, m_items):
        if m is None:
            continue
        if leaf is None:
            raise ValueError(f"mask at {path!r} is set but params has no array there")
        if not hasattr(m, "shape") or not hasattr(m, "dtype"):
            raise ValueError(f"mask at {path!r} must be a bool array or None, got {type(m).__name__}")
        if tuple(m.shape) != tuple(np.shape(leaf)):
            raise ValueError(
                f"mask at {path!r} has shape {tuple(m.shape)}, parameter has {tuple(np.shape(leaf))}"
            )
        if np.dtype(m.dtype) != np.bool_:
            raise ValueError(f"mask at {path!r} has dtype {m.dtype}, expected bool")


def _check_mask_pair(masks: PyTree, other: PyTree, name: str) -> None:
    """``other`` must be a mask with exactly the prunable leaves and shapes of ``masks``."""
    a, b = _items(masks), _items(other)
    if [p for p, _ in a] != [p for p, _ in b] or (
        jax.tree_util.tree_structure(masks, is_leaf=_is_none)
        != jax.tree_util.tree_structure(other, is_leaf=_is_none)
    ):
        raise _structure_error(name, [p for p, _ in a], [p for p, _ in b])
    for (path, m), (_, o) in zip(a, b):
        if (m is None) != (o is None):
            raise ValueError(f"{name} at {path!r}: one mask is None and the other is not")
        if m is None:
            continue
        for label, x in (("masks", m), (name, o)):
            if not hasattr(x, "shape") or np.dtype(x.dtype) != np.bool_:
                raise ValueError(f"{label} at {path!r} must be a bool array")
        if tuple(m.shape) != tuple(o.shape):
            raise ValueError(f"{name} at {path!r} has shape {tuple(o.shape)}, masks have {tuple(m.shape)}")


def _check_scores(masks: PyTree, scores: PyTree) -> None:
    """``scores`` must hold a ``[C]`` array (C = last axis of the mask) at every prunable leaf."""
    m_items, s_items = _items(masks), _items(scores)
    if [p for p, _ in m_items] != [p for p, _ in s_items]:
        raise _structure_error("scores", [p for p, _ in m_items], [p for p, _ in s_items])
    for (path, m), (_, s) in zip(m_items, s_items):
        if m is None:
            continue
        c = m.shape[-1] if m.ndim else 1
        if s is None or not hasattr(s, "shape") or tuple(s.shape) != (c,):
            got = None if s is None else tuple(np.shape(s))
            raise ValueError(f"scores at {path!r} must have shape ({c},), got {got}")


# ----------------------------------------------------------------- which are prunable


def _is_kernel(path: str, leaf: Any, ndim: int) -> bool:
    return path.rsplit("/", 1)[-1] == "kernel" and np.ndim(leaf) == ndim


def stem_path(params: PyTree, stem: str | None = None) -> str | None:
    """Path of the stem conv kernel: ``stem`` resolved, or the first 4-D ``kernel``.

    "First" is in the params dicts' own (insertion) order, which for Flax ``init`` is
    module creation order. ``stem`` may name the kernel (``'conv1/kernel'``) or its
    module (``'conv1'``). Returns None when there is no conv kernel.
    """
    if stem is None:
        for path, leaf in _insertion_order_items(params):
            if _is_kernel(path, leaf, 4):
                return path
        return None
    convs = {path for path, leaf in _items(params) if _is_kernel(path, leaf, 4)}
    for candidate in (stem, stem.rstrip("/") + "/kernel"):
        if candidate in convs:
            return candidate
    raise ValueError(f"stem={stem!r} names no 4-D conv kernel in params; conv kernels: {sorted(convs)[:5]}")


def prunable(params: PyTree, *, conv1: bool = False, fc: bool = False, stem: str | None = None) -> PyTree:
    """Pytree of Python bools with the structure of ``params``: which leaves are prunable.

    Conv kernels (4-D leaves named ``kernel``) except the stem; ``conv1=True`` adds the
    stem; ``fc=True`` adds dense kernels (2-D leaves named ``kernel``). Biases, norms: never.
    """
    stem_p = stem_path(params, stem)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_none)
    out = []
    for path_keys, leaf in flat:
        path = _join(path_keys)
        if _is_kernel(path, leaf, 4):
            out.append(conv1 or path != stem_p)
        elif _is_kernel(path, leaf, 2):
            out.append(bool(fc))
        else:
            out.append(False)
    return jax.tree_util.tree_unflatten(treedef, out)


def init_masks(params: PyTree, *, conv1: bool = False, fc: bool = False, stem: str | None = None) -> PyTree:
    """Mask with every prunable entry True (see ``prunable``) and None elsewhere."""
    which = prunable(params, conv1=conv1, fc=fc, stem=stem)
    return jax.tree_util.tree_map(
        lambda p, x: jnp.ones(np.shape(x), dtype=bool) if p else None, which, params
    )


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """``params`` with every pruned entry exactly 0 (+0.0); leaves with a None mask untouched."""
    check_masks(params, masks)
    return map_masked(lambda w, m: jnp.where(m, w, jnp.zeros_like(w)), params, masks)


# -------------------------------------------------------------------------- pruning


def _check_rate(rate: Any, name: str = "rate", upper_inclusive: bool = False) -> float:
    try:
        value = float(rate)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(f"{name} must be a static Python number, got {rate!r}") from e
    ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if not ok:
        interval = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(f"{name}={rate!r} is outside {interval}")
    return value


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")


def _parse_layer_rates(layer_rates: Any) -> list[tuple[re.Pattern, float]]:
    if layer_rates is None:
        return []
    pairs = layer_rates.items() if isinstance(layer_rates, Mapping) else layer_rates
    try:
        pairs = [tuple(pair) for pair in pairs]
    except TypeError:
        raise ValueError(f"layer_rates must map regular expressions to multipliers, got "
                         f"{layer_rates!r}") from None
    out = []
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(f"layer_rates must map regular expressions (str) to multipliers; "
                             f"bad entry {pair!r}")
        pattern, mult = pair
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"layer_rates pattern {pattern!r} is not a regular expression: {e}") from e
        try:
            mult = float(mult)
        except (TypeError, ValueError) as e:
            raise ValueError(f"layer_rates[{pattern!r}]={mult!r} is not a number") from e
        if not math.isfinite(mult) or mult < 0:
            raise ValueError(f"layer_rates[{pattern!r}]={mult!r} must be a finite number >= 0")
        out.append((compiled, mult))
    return out


def _leaf_rates(masks: PyTree, rate: float, layer_rates: Any) -> np.ndarray:
    """float32 ``[L]``: per prunable leaf (flatten order) ``rate * multiplier`` of the first
    regex matching its path, clipped to [0, 1]; ``rate`` where none matches."""
    rules = _parse_layer_rates(layer_rates)
    out = []
    for path, m in _items(masks):
        if m is None:
            continue
        r = rate
        for pattern, mult in rules:
            if pattern.search(path):
                r = rate * mult
                break
        out.append(min(max(r, 0.0), 1.0))
    return np.asarray(out, dtype=np.float32)


def _count(rate: jax.Array, n: jax.Array) -> jax.Array:
    """``round(rate * n)`` (half to even) in float32; ``rate`` is a float32 scalar."""
    return jnp.round(rate * n.astype(jnp.float32)).astype(jnp.int32)


def _lowest_per_segment(keys: tuple[jax.Array, ...], sizes: Sequence[int], counts: jax.Array) -> jax.Array:
    """Bool ``[N]``: in each segment, its ``counts[j]`` entries lowest by ``keys`` (lexicographic),
    ties broken by lower index.

    ``keys`` are flat ``[N]`` arrays over the concatenation of segments of static ``sizes``;
    one sort serves every segment (the segment id is the primary key), so compile time
    does not grow with the number of layers.
    """
    n = int(sum(sizes))
    iota = jnp.arange(n, dtype=jnp.int32)
    if len(sizes) == 1:
        order = lax.sort((*keys, iota), num_keys=len(keys) + 1)[-1]
        chosen_sorted = iota < counts[0]
    else:
        # Segment ids from iota and [L] offsets, not [N] constants baked into the program.
        ends = jnp.asarray(np.cumsum(sizes), dtype=jnp.int32)
        starts = jnp.asarray(np.cumsum([0] + list(sizes[:-1])), dtype=jnp.int32)
        seg = jnp.searchsorted(ends, iota, side="right").astype(jnp.int32)
        order = lax.sort((seg, *keys, iota), num_keys=len(keys) + 2)[-1]
        # Sorted by segment first, so sorted position i belongs to segment seg[i].
        chosen_sorted = iota - starts[seg] < counts[seg]
    return jnp.zeros((n,), dtype=bool).at[order].set(chosen_sorted)


def _split(flat: jax.Array, sizes: Sequence[int]) -> list[jax.Array]:
    offsets = np.cumsum([0] + list(sizes))
    return [flat[offsets[j] : offsets[j + 1]] for j in range(len(sizes))]


def _prune_flat(
    kept: list[jax.Array], keys: tuple[jax.Array, ...], rates: jax.Array, scope: str
) -> list[jax.Array]:
    """Flat masks (one per prunable leaf) without the kept entries lowest by ``keys``.

    ``keys`` are score arrays over the concatenation of the leaves (lexicographic).
    ``rates`` is float32 ``[L]``; ``'global'`` uses ``rates[0]`` over all leaves as one
    segment. Pruned entries sort after kept ones, so exactly the counted kept entries go.
    """
    sizes = [k.shape[0] for k in kept]
    all_kept = jnp.concatenate(kept)
    if scope == "global":
        segment_sizes = [sum(sizes)]
        counts = _count(rates[0], jnp.sum(all_kept, dtype=jnp.int32))[None]
    else:
        segment_sizes = sizes
        counts = jnp.stack([_count(rates[j], jnp.sum(k, dtype=jnp.int32)) for j, k in enumerate(kept)])
    pruned = jnp.logical_not(all_kept).astype(jnp.int32)
    removed = _lowest_per_segment((pruned, *keys), segment_sizes, counts)
    return _split(jnp.logical_and(all_kept, jnp.logical_not(removed)), sizes)


# The cores are jitted with only the scope static, so an eager caller compiles one
# program per mask structure, whatever the rate or the mask contents.
@functools.partial(jax.jit, static_argnames=("scope",))
def _magnitude_core(weights, kept, rates, scope):
    scores = jnp.concatenate([jnp.abs(w.reshape(-1).astype(jnp.float32)) for w in weights])
    return _prune_flat([k.reshape(-1) for k in kept], (scores,), rates, scope)


@functools.partial(jax.jit, static_argnames=("scope",))
def _random_core(key, kept, rates, scope):
    # 64 random bits per entry as two sort keys: a tie (then broken by index) has
    # probability about N^2 / 2^65, so the choice is uniform for any practical N.
    n = sum(k.size for k in kept)
    bits = jax.random.bits(key, (2, n), dtype=jnp.uint32)
    return _prune_flat([k.reshape(-1) for k in kept], (bits[0], bits[1]), rates, scope)


def _prunable_leaves(tree: PyTree, masks: PyTree) -> list[Any]:
    """Leaves of ``tree`` (params- or mask-structured) where ``masks`` is not None, flatten order."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=_is_none)
    return [x for x, m in zip(leaves, jax.tree_util.tree_leaves(masks, is_leaf=_is_none)) if m is not None]


def _replace_prunable(masks: PyTree, new: list[jax.Array]) -> PyTree:
    """``masks`` with its non-None leaves replaced, in flatten order, by ``new`` (reshaped)."""
    flat, treedef = jax.tree_util.tree_flatten(masks, is_leaf=_is_none)
    it = iter(new)
    leaves = [None if m is None else next(it).reshape(m.shape) for m in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _prepare_rates(masks: PyTree, rate: Any, scope: str, layer_rates: Any) -> jax.Array:
    rate = _check_rate(rate)
    _check_scope(scope)
    if scope == "global":
        if layer_rates:
            raise ValueError("layer_rates needs scope='layerwise' (a global ranking has no per-layer rate)")
        return jnp.asarray([rate], dtype=jnp.float32)
    return jnp.asarray(_leaf_rates(masks, rate, layer_rates))


def magnitude_prune(
    params: PyTree, masks: PyTree, rate: float, *, scope: str = "global", layer_rates: Any = None
) -> PyTree:
    """New mask without the ``round(rate * n)`` kept entries of smallest |w|.

    ``n`` counts the currently kept entries over all prunable leaves (``scope='global'``)
    or per leaf (``'layerwise'``). Already-pruned entries stay pruned. ``layer_rates``
    (layerwise only; a mapping or sequence of pairs) maps a regex, matched with
    ``re.search`` against the leaf path, to a multiplier of ``rate``; the first match
    wins and the product is clipped to [0, 1]. Ties break by lower flat index.
    """
    check_masks(params, masks)
    rates = _prepare_rates(masks, rate, scope, layer_rates)
    kept = _prunable_leaves(masks, masks)
    if not kept:
        return masks
    return _replace_prunable(masks, _magnitude_core(_prunable_leaves(params, masks), kept, rates, scope))


def random_prune(
    key: jax.Array, masks: PyTree, rate: float, *, scope: str = "global", layer_rates: Any = None
) -> PyTree:
    """Like ``magnitude_prune`` (same counts) with the removed entries uniform among kept ones.

    Scores are 64 random bits per entry, drawn once over all prunable entries.
    """
    _check_mask_pair(masks, masks, "masks")
    rates = _prepare_rates(masks, rate, scope, layer_rates)
    kept = _prunable_leaves(masks, masks)
    if not kept:
        return masks
    return _replace_prunable(masks, _random_core(key, kept, rates, scope))


@jax.jit
def _filter_core(weights, kept, rates):
    axes = [tuple(range(m.ndim - 1)) for m in kept]
    l1 = [
        jnp.sum(jnp.abs(jnp.where(m, w, 0).astype(jnp.float32)), axis=a)
        for w, m, a in zip(weights, kept, axes)
    ]
    remaining = [jnp.any(m, axis=a) for m, a in zip(kept, axes)]
    counts = jnp.stack([_count(rates[j], jnp.sum(r, dtype=jnp.int32)) for j, r in enumerate(remaining)])
    dead = jnp.logical_not(jnp.concatenate(remaining)).astype(jnp.int32)
    removed = _lowest_per_segment((dead, jnp.concatenate(l1)), [r.shape[0] for r in remaining], counts)
    channels = _split(jnp.logical_not(removed), [r.shape[0] for r in remaining])
    return [jnp.logical_and(m, ch) for m, ch in zip(kept, channels)]


def filter_prune(params: PyTree, masks: PyTree, rate: float, *, layer_rates: Any = None) -> PyTree:
    """Structured prune: in each prunable leaf remove ``round(rate * f)`` of its ``f`` remaining
    output channels (remaining = any entry kept), those of smallest L1 norm of the masked
    weights; ties remove the lower channel index first. A removed channel is all False.
    ``layer_rates`` as in ``magnitude_prune``.
    """
    check_masks(params, masks)
    rates = _prepare_rates(masks, rate, "layerwise", layer_rates)
    kept = _prunable_leaves(masks, masks)
    if not kept:
        return masks
    return _replace_prunable(masks, _filter_core(_prunable_leaves(params, masks), kept, rates))


# --------------------------------------------------------------------------- refill


def _refill_k_python(kept: int, c: int, f: int, fillback_rate: float) -> int:
    """docs/SPEC.md section 2 step 2, without the max(1, .):
    ``int(n + (C - n) * fillback_rate)``."""
    n = kept / f
    return int(n + (c - n) * fillback_rate)


@functools.lru_cache(maxsize=1024)
def _refill_thresholds(c: int, f: int, fillback_rate: float) -> np.ndarray:
    """``thr[j-1]`` = fewest kept entries for which the k formula gives at least ``j`` (j = 1..C).

    The formula is evaluated in Python float64 (exactly as written in docs/SPEC.md) outside
    the traced code; inside, ``k = max(1, sum(kept >= thr))`` has no float32 surprises.
    """
    total = c * f
    thr = np.empty(c, dtype=np.int64)
    for j in range(1, c + 1):
        if fillback_rate >= 1.0:
            guess = 0
        else:
            guess = math.ceil(f * (j - c * fillback_rate) / (1.0 - fillback_rate))
        guess = min(max(guess, 0), total + 1)
        while guess > 0 and _refill_k_python(guess - 1, c, f, fillback_rate) >= j:
            guess -= 1
        while guess <= total and _refill_k_python(guess, c, f, fillback_rate) < j:
            guess += 1
        thr[j - 1] = guess
    thr = np.minimum(thr, np.iinfo(np.int32).max).astype(np.int32)
    thr.flags.writeable = False
    return thr


@jax.jit
def _refill_core(kept, scores, thresholds):
    """Per leaf, the ``k`` highest-scored channels (ties -> lower index; NaN ranks lowest)."""
    ks = jnp.stack([
        jnp.maximum(1, jnp.sum(jnp.sum(m, dtype=jnp.int32) >= thr, dtype=jnp.int32))
        for m, thr in zip(kept, thresholds)
    ])
    s = jnp.concatenate([x.astype(jnp.float32) for x in scores])
    s = jnp.where(jnp.isnan(s), -jnp.inf, s)
    sizes = [x.shape[0] for x in scores]
    return _split(_lowest_per_segment((-s,), sizes, ks), sizes)


def refill_channels(masks: PyTree, scores: PyTree, fillback_rate: float = 0.0) -> PyTree:
    """The ``[C]`` bool channel choice of ``refill`` per prunable leaf (None elsewhere)."""
    fillback_rate = _check_rate(fillback_rate, "fillback_rate", upper_inclusive=True)
    _check_mask_pair(masks, masks, "masks")
    _check_scores(masks, scores)
    kept = _prunable_leaves(masks, masks)
    if not kept:
        return masks
    thresholds = []
    for m in kept:
        c = m.shape[-1] if m.ndim else 1
        f = max(int(np.prod(m.shape)) // max(c, 1), 1)
        thresholds.append(jnp.asarray(_refill_thresholds(c, f, fillback_rate)))
    channels = _refill_core(kept, _prunable_leaves(scores, masks), thresholds)
    flat, treedef = jax.tree_util.tree_flatten(masks, is_leaf=_is_none)
    it = iter(channels)
    return jax.tree_util.tree_unflatten(treedef, [None if m is None else next(it) for m in flat])


def refill(masks: PyTree, scores: PyTree, fillback_rate: float = 0.0) -> PyTree:
    """Channel-wise mask (docs/SPEC.md section 2 step 2).

    For a prunable leaf with ``C`` output channels and ``F = size / C`` entries per
    channel, ``n = kept / F`` and ``k = max(1, int(n + (C - n) * fillback_rate))``
    (Python float64 semantics). The top-k channels by ``scores`` (a ``[C]`` array per
    prunable leaf, None elsewhere) are all True, the others all False. Ties: higher
    score first, then lower channel index; exactly ``k`` channels are kept.
    """
    channels = refill_channels(masks, scores, fillback_rate)
    return map_prunable(lambda m, ch: jnp.broadcast_to(ch, m.shape), masks, channels)


def rsst_targets(masks: PyTree, channel_masks: PyTree) -> PyTree:
    """Bool pytree: entries kept by ``masks`` (M) and removed by ``channel_masks`` (S).

    These are the weights the RSST penalty pushes to zero; None for non-prunable leaves.
    """
    _check_mask_pair(masks, channel_masks, "channel_masks")
    return map_prunable(lambda m, s: jnp.logical_and(m, jnp.logical_not(s)), masks, channel_masks)


# ------------------------------------------------------------------ whole channels


def live_channels(masks: PyTree) -> dict[str, np.ndarray]:
    """{path: bool [C]} of each prunable leaf: output channels with any kept entry
    (host side, concrete masks)."""
    out = {}
    for path, m in _items(masks):
        if m is not None:
            m = np.asarray(m, bool)
            out[path] = m.reshape(-1, m.shape[-1]).any(axis=0) if m.ndim else m.reshape(1)
    return out


def remove_units(masks: PyTree, units: Sequence[tuple[float, Sequence[tuple[str, int]]]],
                 count: int) -> PyTree:
    """``masks`` without the ``count`` lowest-scoring ``units`` (score, members): a unit
    is the output channels (path, channel) that go together (one channel, or channels
    coupled through a residual addition), all of each member's entries set False.

    Ascending score, ties by the order of ``units``; a unit is skipped where removing it
    would leave one of its layers without a live channel (so fewer than ``count`` may go).
    Host side: concrete masks, numpy."""
    live = live_channels(masks)
    unknown = {p for _, members in units for p, _ in members} - set(live)
    if unknown:
        raise ValueError(f"remove_units: {sorted(unknown)[:3]} are not prunable leaves of the "
                         f"masks")
    order = sorted(range(len(units)), key=lambda i: (float(units[i][0]), i))
    removed = 0
    for i in order:
        if removed >= count:
            break
        members = units[i][1]
        if not any(live[p][c] for p, c in members):
            continue  # already gone
        lost: dict[str, int] = {}
        for p, c in members:
            lost[p] = lost.get(p, 0) + int(live[p][c])
        if any(lost[p] >= live[p].sum() for p in lost):
            continue  # a layer would lose its last channel
        for p, c in members:
            live[p][c] = False
        removed += 1
    return jax.tree_util.tree_map_with_path(
        lambda path, m: None if m is None else jnp.logical_and(
            m, jnp.asarray(live[trees.join(path)])), masks, is_leaf=_is_none)


def remove_channels(masks: PyTree, scores: Mapping[str, Any], rate: float) -> PyTree:
    """``masks`` without ``round(rate * n)`` of their n live output channels over the
    whole network: those with the lowest ``scores`` ({path: [C]} for the prunable leaves
    that may lose channels; a leaf not in it keeps its channels), never a layer's last
    live channel (``remove_units``; ties by leaf order, then lower channel index)."""
    live = live_channels(masks)
    units = [(float(np.asarray(scores[p])[c]), [(p, c)])
             for p, alive in live.items() if p in scores for c in np.flatnonzero(alive)]
    return remove_units(masks, units, int(round(_check_rate(rate) * len(units))))


# -------------------------------------------------------------------------- reports


def density(masks: PyTree) -> float:
    """Fraction of prunable entries kept (1.0 when nothing is prunable). Needs concrete masks."""
    leaves = [np.asarray(m) for m in jax.tree_util.tree_leaves(masks)]
    total = sum(m.size for m in leaves)
    return float(sum(int(m.sum()) for m in leaves) / total) if total else 1.0


def _channels(m: np.ndarray) -> tuple[int, int]:
    """(channels with any kept entry, channels) of one mask; channel = last axis."""
    if m.ndim == 0:
        return int(bool(m)), 1
    alive = m.reshape(-1, m.shape[-1]).any(axis=0)
    return int(alive.sum()), int(m.shape[-1])


def channel_sparsity(masks: PyTree) -> float:
    """Fraction of prunable output channels that are all False (0.0 when nothing is prunable)."""
    counts = [_channels(np.asarray(m)) for m in jax.tree_util.tree_leaves(masks)]
    total = sum(c for _, c in counts)
    return float(1.0 - sum(a for a, _ in counts) / total) if total else 0.0


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One prunable leaf in ``report``; ``nonzero`` counts nonzero weights when params are given."""

    path: str
    shape: tuple[int, ...]
    kept: int
    total: int
    density: float
    channels_kept: int
    channels_total: int
    nonzero: int | None = None


def report(masks: PyTree, params: PyTree | None = None) -> list[LayerRow]:
    """Per prunable leaf: kept/total entries, density, alive/total output channels.

    With ``params``, also the number of nonzero weights (to check masks were applied).
    """
    if params is not None:
        check_masks(params, masks)
        weights = dict(_items(params))
    rows = []
    for path, m in _items(masks):
        if m is None:
            continue
        m = np.asarray(m)
        ch_kept, ch_total = _channels(m)
        rows.append(
            LayerRow(
                path=path,
                shape=tuple(m.shape),
                kept=int(m.sum()),
                total=int(m.size),
                density=float(m.sum() / m.size) if m.size else 1.0,
                channels_kept=ch_kept,
                channels_total=ch_total,
                nonzero=None if params is None else int(np.count_nonzero(np.asarray(weights[path]))),
            )
        )
    return rows


def format_report(rows: Sequence[LayerRow]) -> str:
    """Aligned text table of ``report`` rows with a total row."""
    with_nonzero = any(r.nonzero is not None for r in rows)
    header = ["path", "shape", "kept", "total", "density", "channels"] + (["nonzero"] if with_nonzero else [])

    def line(path, shape, kept, total, ch_kept, ch_total, nonzero):
        cells = [
            path,
            shape,
            str(kept),
            str(total),
            f"{100.0 * kept / total:.2f}%" if total else "-",
            f"{ch_kept}/{ch_total}",
        ]
        if with_nonzero:
            cells.append("-" if nonzero is None else str(nonzero))
        return cells

    body = [
        line(
            r.path, "x".join(map(str, r.shape)), r.kept, r.total, r.channels_kept, r.channels_total, r.nonzero
        )
        for r in rows
    ]
    nonzeros = [r.nonzero for r in rows if r.nonzero is not None]
    total = line(
        "total",
        "",
        sum(r.kept for r in rows),
        sum(r.total for r in rows),
        sum(r.channels_kept for r in rows),
        sum(r.channels_total for r in rows),
        sum(nonzeros) if nonzeros else None,
    )
    table = [header] + body + [total]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]

    def fmt(row):
        # Text columns (path, shape) left-aligned, numbers right-aligned.
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule] + [fmt(r) for r in body] + [rule, fmt(total)])


# ------------------------------------------------------------------------ optimizer


def keep_pruned() -> optax.GradientTransformationExtraArgs:
    """Zero the updates of pruned entries: ``update(..., masks=M)`` returns ``where(M, u, 0)``.

    ``masks`` is an extra argument (a traced input of the compiled step); leaves with a
    None mask pass unchanged, and ``masks=None`` is the identity. Chain it after anything
    that can move a weight on its own (weight decay, momentum) so pruned entries stay 0.
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, masks=None, **extra):
        del params, extra
        if masks is None:
            return updates, state
        check_masks(updates, masks)
        return map_masked(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, masks), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
