"""Pytree helpers every module shares: leaf paths, None leaves, and the ticket axis.

Mask and score trees have ``None`` where a leaf is not prunable; JAX treats ``None`` as
an empty subtree, so the helpers here that must see those leaves flatten with
:func:`is_none` as the leaf test. Tickets trained as one program carry a leading ticket
axis on every array: :func:`stack` makes it, :func:`ticket` takes one out,
:func:`for_each` maps a function of one ticket over it. Imports nothing of the library.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp

PyTree = Any


def is_none(x: Any) -> bool:
    return x is None


def map_masks(fn: Callable, tree: PyTree, *rest: PyTree) -> PyTree:
    """``fn`` over the leaves of mask-like trees, None leaves kept None."""
    return jax.tree_util.tree_map(lambda m, *o: None if m is None else fn(m, *o), tree, *rest,
                                  is_leaf=is_none)


def update_masked(fn: Callable, masks: PyTree, tree: PyTree, *rest: PyTree) -> PyTree:
    """``tree`` with ``fn(mask, leaf, *other leaves)`` where ``masks`` has a leaf; the
    leaves of ``tree`` unchanged where the mask is None (a penalty on a gradient)."""
    return jax.tree_util.tree_map(lambda m, x, *o: x if m is None else fn(m, x, *o), masks,
                                  tree, *rest, is_leaf=is_none)


def map_masks_with_path(fn: Callable, tree: PyTree) -> PyTree:
    """``fn(path, leaf)`` over a mask-like tree ('/'-joined path), None leaves kept None."""
    return jax.tree_util.tree_map_with_path(
        lambda path, m: None if m is None else fn(join(path), m), tree, is_leaf=is_none)


# --------------------------------------------------------------------------- paths

def key_str(key: Any) -> str:
    """One path entry as text (dict key, sequence index, attribute name)."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return str(key.name)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def join(path: Sequence[Any]) -> str:
    """A key path as 'a/b/leaf'."""
    return "/".join(key_str(k) for k in path)


def path_tuple(key_path: Iterable[Any]) -> tuple:
    """A key path as a tuple of its keys, names and indices."""
    out = []
    for k in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
        else:
            raise TypeError(f"unsupported pytree key {k!r}")
    return tuple(out)


def items(tree: PyTree) -> list[tuple[str, Any]]:
    """(path, leaf) pairs in flatten order; ``None`` counts as a leaf."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none)
    return [(join(path), leaf) for path, leaf in flat]


def tree_paths(tree: PyTree) -> list[str]:
    """'/'-joined path of every leaf, in ``jax.tree_util`` flatten order.

    ``None`` counts as a leaf, so a mask and its params give the same list.
    """
    return [path for path, _ in items(tree)]


def insertion_order_items(tree: PyTree, prefix: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """(path, leaf) pairs walking dicts in their own (insertion) order.

    Flax ``init`` builds params dicts in module creation order, which JAX's flatten
    (sorted keys) loses; the stem is "the first conv" in this order.
    """
    if isinstance(tree, Mapping):
        out = []
        for k, v in tree.items():
            out.extend(insertion_order_items(v, prefix + (str(k),)))
        return out
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        out = []
        for i, v in enumerate(tree):
            out.extend(insertion_order_items(v, prefix + (str(i),)))
        return out
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none)
    if len(flat) == 1 and flat[0][0] == ():
        return [("/".join(prefix), flat[0][1])]
    return [("/".join(prefix + tuple(key_str(k) for k in path)), leaf) for path, leaf in flat]


def flat_dict(tree: PyTree) -> dict[str, Any]:
    """``{'a/b/leaf': leaf}`` with dicts walked in their own order (params before
    batch_stats, layers in creation order); ``None`` leaves are kept (mask trees)."""
    return dict(insertion_order_items(tree))


# --------------------------------------------------------------------------- tickets

def stack(trees: Sequence[PyTree]) -> PyTree:
    """K trees of one structure -> one tree with a leading ticket axis (None stays)."""
    flat = [jax.tree_util.tree_flatten(t, is_leaf=is_none) for t in trees]
    leaves = [None if xs[0] is None else jnp.stack(xs) for xs in zip(*(f[0] for f in flat))]
    return jax.tree_util.tree_unflatten(flat[0][1], leaves)


def ticket(tree: PyTree, k: int) -> PyTree:
    """Ticket ``k`` of a stacked tree."""
    return jax.tree_util.tree_map(lambda x: None if x is None else x[k], tree, is_leaf=is_none)


def for_each(fn: Callable, num: int, *stacked: PyTree):
    """``fn(k, *ticket_k_of_each)`` for every ticket, the results stacked (tuples of
    results become tuples of stacked trees)."""
    outs = [fn(k, *(ticket(t, k) for t in stacked)) for k in range(num)]
    if isinstance(outs[0], tuple):
        return tuple(stack([o[i] for o in outs]) for i in range(len(outs[0])))
    return stack(outs)


def replace_ticket(stacked: PyTree, k: int, tree: PyTree) -> PyTree:
    """``stacked`` with ticket k replaced by ``tree``."""
    return jax.tree_util.tree_map(lambda s, x: s.at[k].set(x), stacked, tree)


def copy(tree: PyTree) -> PyTree:
    """An independent copy: the train step donates its input buffers."""
    return jax.tree_util.tree_map(jnp.copy, tree)


__all__ = ["is_none", "map_masks", "update_masked", "map_masks_with_path", "key_str", "join", "path_tuple", "items", "tree_paths",
           "insertion_order_items", "flat_dict", "stack", "ticket", "for_each",
           "replace_ticket", "copy"]
