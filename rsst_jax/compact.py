"""Compaction: turn a channel-sparse ticket into a physically narrower network.

A masked network computes as many multiply-adds as the dense one; ``compact`` removes the
pruned channels for real and returns a network of the same family with per-layer widths.

How, without knowing any layer names:

1. **Channel flow.** ``model.apply`` is traced once to a jaxpr and followed channel by
   channel (the last axis, NHWC). Every conv/dense output channel starts a node.
   Elementwise ops (BatchNorm, ReLU, the residual add) merge the nodes of the channels they
   combine into one *group*; zero-padding along channels (option-A shortcuts) shifts
   indices; pooling and reshapes that keep the last axis keep them. A group is removed as
   a whole: a residual-stream channel is one group with every layer that writes into it.
   Conv/dense kernels are the variables feeding ``conv_general_dilated``/``dot_general``;
   per-channel variables (BatchNorm scale, bias and running statistics, conv biases) are
   the 1-D variables combined elementwise with a channel. Any op it cannot follow keeps
   (pins) every channel it touches, so an unknown network compacts less, never wrongly.
2. **Decision.** A group goes when its value is exactly zero for every input -- each
   writer's kernel channel is pruned (or reads only zero channels) and every per-channel
   module applied on the way maps 0 to 0, which for BatchNorm means zero scale and bias
   (``--mask_bn``, see ``bn_masks``) -- or when nothing reads it (every reader's weights
   for it are pruned). ``approximate=True`` drops the "maps 0 to 0" condition: a pruned
   channel whose BatchNorm still adds a constant is removed anyway and the caller measures
   the error. A depthwise conv's input channel and output channel go together. Every
   layer keeps at least one channel, and ``round_to`` keeps removable (zero or unread)
   channels so that widths are multiples of it, for hardware that wants aligned widths.
3. **Rebuild.** Each variable is sliced along the axes the flow recorded; the narrower
   module comes from the family's rebuilder (``register_rebuild``), which reads the compact
   kernel shapes. Option-A ResNets get explicit shortcut channel maps, so residual-stream
   channels are removed there too.

Also: ``count_params``, ``count_flops`` (multiply-accumulates, MACs, of convs and dense
layers for one image; FLOPs = 2 * MACs; BatchNorm, activations, adds and pooling are not
counted) and ``compact_stats`` for the analysis commands. Equivalence holds in eval mode
(running statistics); nothing here prints or touches files.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import types
from collections import defaultdict
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import unflatten_dict
from jax.extend import core as jex_core

from rsst_jax import masks as masks_lib
from rsst_jax import nets
from rsst_jax.model_masks import (  # noqa: F401  (re-exported: their old home)
    bn_masks, conv_bn_pairs, masked_variables, merge_masks, stem_kernel)
from rsst_jax.model_masks import module_calls as _trace_calls

__all__ = ["bn_masks", "merge_masks", "conv_bn_pairs", "compact", "masked_variables",
           "count_params", "count_flops", "compact_stats", "register_rebuild",
           "model_from_description", "ChannelFlow", "channel_flow"]

PyTree = Any
ZERO = -1  # label of a channel that is a constant zero (e.g. the padding of a shortcut)


def _is_none(x) -> bool:
    return x is None


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def _like(params: PyTree, values: dict[str, Any]) -> PyTree:
    """A tree with the structure of ``params``: ``values[path]`` where given, None elsewhere."""
    treedef = jax.tree_util.tree_structure(params, is_leaf=_is_none)
    return jax.tree_util.tree_unflatten(treedef,
                                        [values.get(p) for p in masks_lib.tree_paths(params)])


# --------------------------------------------------------------------------- channel flow

@dataclasses.dataclass(frozen=True)
class _Data:
    """A value computed from the input: ``labels[c]`` is the node of channel c (or ZERO)."""
    labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Const:
    """A value computed from variables and literals only."""
    leaf: Optional[str] = None                 # this value is variable ``leaf`` (maybe cast)
    channel_leaves: frozenset = frozenset()    # 1-D variables laid along the last axis
    zero: bool = False                         # known to be all zeros


@dataclasses.dataclass
class _Layer:
    kind: str              # 'conv', 'depthwise' or 'dense'
    in_labels: np.ndarray
    out_labels: np.ndarray


# Elementwise primitives that map 0 to 0 (unary) or are handled by the binary rules below.
_UNARY_ZERO = {"neg", "abs", "sign", "convert_element_type", "copy", "copy_p", "reduce_precision",
               "sqrt", "cbrt", "tanh", "tan", "sin", "sinh", "asin", "asinh", "atan", "atanh",
               "floor", "ceil", "round", "erf", "expm1", "log1p", "real", "square",
               "stop_gradient", "optimization_barrier"}
_BINARY = {"add", "sub", "mul", "div", "max", "min", "add_any"}
_SHAPE_OPS = {"reshape", "broadcast_in_dim", "squeeze", "expand_dims", "transpose"}
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod"}
_WINDOW = {"reduce_window_max", "reduce_window_min", "reduce_window_sum"}
_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr", "checkpoint": "jaxpr", "remat": "jaxpr"}


class ChannelFlow:
    """Union-find over channel nodes, filled by following one jaxpr (see module docstring).

    After ``run``: ``layers`` maps each conv/dense kernel path to its input/output channel
    labels; ``axes[leaf][axis]`` the labels along each sliceable axis of a variable;
    ``modules`` the (module path, labels) of per-channel variables applied to channels;
    ``pinned`` the nodes that must stay (network input and output, unfollowed ops).
    """

    def __init__(self, leaf_sizes: dict[str, tuple]):
        self.parent: list[int] = []
        self.pinned: set[int] = set()
        self.writer: dict[int, tuple[str, int]] = {}
        self.layers: dict[str, _Layer] = {}
        self.axes: dict[str, dict[int, np.ndarray]] = {}
        self.modules: list[tuple[str, np.ndarray]] = []
        self.opaque: list[str] = []
        self._shapes = leaf_sizes

    # ---- union-find
    def fresh(self, n: int, *, pinned: bool = False, writer: Optional[str] = None) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        if pinned:
            self.pinned.update(range(start, start + n))
        if writer is not None:
            for c in range(n):
                self.writer[start + c] = (writer, c)
        return np.arange(start, start + n)

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> int:
        if a == ZERO:
            return b
        if b == ZERO:
            return a
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
        return ra

    def union_labels(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.asarray([self.union(int(x), int(y)) for x, y in zip(a, b)])

    def pin(self, labels: np.ndarray) -> None:
        self.pinned.update(int(lab) for lab in labels if lab != ZERO)

    def _record_axis(self, leaf: str, axis: int, labels: np.ndarray) -> None:
        have = self.axes.setdefault(leaf, {})
        if axis in have:
            if len(have[axis]) != len(labels):
                self.pin(labels), self.pin(have[axis])
                return
            have[axis] = self.union_labels(have[axis], labels)
        else:
            have[axis] = np.asarray(labels)

    # ---- the walk
    def run(self, jaxpr, infos: list, consts: Sequence = ()) -> list:
        env: dict = {}

        def read(v):
            if isinstance(v, jex_core.Literal):
                return _Const(zero=bool(np.all(np.asarray(v.val) == 0)))
            return env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = _Const(zero=bool(np.all(np.asarray(c) == 0)))
        for v, info in zip(jaxpr.invars, infos):
            env[v] = info
        for eqn in jaxpr.eqns:
            outs = self._eqn(eqn, [read(v) for v in eqn.invars])
            for v, o in zip(eqn.outvars, outs):
                if not isinstance(v, jex_core.DropVar):
                    env[v] = o
        return [read(v) for v in jaxpr.outvars]

    def _eqn(self, eqn, ins: list) -> list:
        name = eqn.primitive.name
        if name in _CALLS and _CALLS[name] in eqn.params:
            sub = eqn.params[_CALLS[name]]
            if hasattr(sub, "jaxpr"):   # ClosedJaxpr
                return self.run(sub.jaxpr, ins, sub.consts)
            return self.run(sub, ins)
        if not any(isinstance(i, _Data) for i in ins):
            return [self._const(eqn, ins, v.aval) for v in eqn.outvars]
        out_aval = eqn.outvars[0].aval
        if name == "conv_general_dilated":
            return self._conv(eqn, ins)
        if name == "dot_general":
            return self._dot(eqn, ins)
        if name in _UNARY_ZERO or (name == "integer_pow" and eqn.params["y"] > 0):
            return [ins[0]]
        if name in _BINARY or name == "select_n":
            return self._elementwise(eqn, ins, out_aval)
        if name in _SHAPE_OPS and self._keeps_last_axis(eqn):
            return [ins[0]]
        if name in _REDUCE and (len(eqn.invars[0].aval.shape) - 1) not in eqn.params["axes"]:
            return [ins[0]]
        if name in _WINDOW and len(ins) == 1 and self._window_keeps_channels(eqn):
            return [ins[0]]
        if name == "slice" and isinstance(ins[0], _Data):
            start, stop = eqn.params["start_indices"][-1], eqn.params["limit_indices"][-1]
            step = (eqn.params["strides"] or (1,) * len(eqn.params["start_indices"]))[-1]
            return [_Data(ins[0].labels[start:stop:step])]
        if name == "pad" and isinstance(ins[0], _Data) and isinstance(ins[1], _Const):
            return self._pad(eqn, ins)
        if name == "concatenate":
            return self._concat(eqn, ins, out_aval)
        return self._opaque(eqn, ins)

    def _opaque(self, eqn, ins: list) -> list:
        self.opaque.append(f"{eqn.primitive.name} at {eqn.source_info.name_stack}")
        for i in ins:
            if isinstance(i, _Data):
                self.pin(i.labels)
        return [_Data(self.fresh(v.aval.shape[-1] if v.aval.shape else 1, pinned=True))
                for v in eqn.outvars]

    def _const(self, eqn, ins: list, aval) -> _Const:
        name = eqn.primitive.name
        last = aval.shape[-1] if aval.shape else None
        leaf = ins[0].leaf if name in ("convert_element_type", "copy", "copy_p") else None
        leaves: set = set()
        if name in _SHAPE_OPS:
            if self._keeps_last_axis(eqn):
                leaves = set(ins[0].channel_leaves)
        elif name in _BINARY or name in _UNARY_ZERO or name in ("rsqrt", "exp", "log",
                                                                "integer_pow", "pow", "logistic"):
            leaves = set().union(*(i.channel_leaves for i in ins if isinstance(i, _Const)))
        leaves = {lf for lf in leaves if last is not None and self._shapes[lf] == (last,)}
        if name == "mul":
            zero = any(i.zero for i in ins)
        elif name in ("add", "sub", "max", "min", "convert_element_type", "neg") \
                or name in _SHAPE_OPS:
            zero = all(i.zero for i in ins)
        else:
            zero = False
        return _Const(leaf=leaf, channel_leaves=frozenset(leaves), zero=zero)

    @staticmethod
    def _keeps_last_axis(eqn) -> bool:
        name = eqn.primitive.name
        in_shape, out_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
        if not in_shape or not out_shape or in_shape[-1] != out_shape[-1]:
            return False
        if name == "broadcast_in_dim":
            return eqn.params["broadcast_dimensions"][-1] == len(out_shape) - 1
        if name == "transpose":
            return eqn.params["permutation"][-1] == len(in_shape) - 1
        if name == "squeeze":
            return (len(in_shape) - 1) not in eqn.params["dimensions"]
        if name == "reshape":
            return math.prod(in_shape) == math.prod(out_shape)
        return name == "expand_dims"

    @staticmethod
    def _window_keeps_channels(eqn) -> bool:
        p = eqn.params
        ok = p["window_dimensions"][-1] == 1 and p["window_strides"][-1] == 1 \
            and tuple(p["padding"][-1]) == (0, 0)
        for key in ("base_dilation", "window_dilation"):
            ok = ok and (key not in p or p[key][-1] == 1)
        return ok

    def _elementwise(self, eqn, ins: list, out_aval) -> list:
        name = eqn.primitive.name
        n = out_aval.shape[-1] if out_aval.shape else None
        operands = ins[1:] if name == "select_n" else ins
        if name == "select_n" and isinstance(ins[0], _Data):
            return self._opaque(eqn, ins)
        labels = None
        for v, i in zip(eqn.invars[len(ins) - len(operands):], operands):
            if isinstance(i, _Data):
                if not v.aval.shape or v.aval.shape[-1] != n:  # broadcast along channels
                    return self._opaque(eqn, ins)
                labels = i.labels if labels is None else self.union_labels(labels, i.labels)
        keeps_zero = True
        for pos, i in enumerate(operands):
            if not isinstance(i, _Const):
                continue
            for lf in i.channel_leaves:
                self._record_axis(lf, 0, labels)
                self.modules.append((lf.split("/", 1)[1].rsplit("/", 1)[0]
                                     if lf.count("/") > 1 else "", labels))
            if name == "mul" or (name == "div" and pos == 1):
                continue
            if name in ("add", "sub", "max", "min", "add_any", "select_n") \
                    and (i.zero or i.channel_leaves):
                continue  # per-channel constants are checked through their module
            keeps_zero = False
        if not keeps_zero:
            self.pin(labels)
        return [_Data(labels)]

    def _pad(self, eqn, ins: list) -> list:
        lo, hi, interior = eqn.params["padding_config"][-1]
        if interior:
            return self._opaque(eqn, ins)
        labels = list(ins[0].labels)
        filler = (lambda k: [ZERO] * k) if ins[1].zero else \
            (lambda k: list(self.fresh(k, pinned=True)))
        labels = labels[-lo:] if lo < 0 else filler(lo) + labels
        labels = labels[:len(labels) + hi] if hi < 0 else labels + filler(hi)
        return [_Data(np.asarray(labels, dtype=int))]

    def _concat(self, eqn, ins: list, out_aval) -> list:
        dim = eqn.params["dimension"]
        if dim != len(out_aval.shape) - 1:
            labels = None
            for i in ins:
                if isinstance(i, _Data):
                    labels = i.labels if labels is None else self.union_labels(labels, i.labels)
            return [_Data(labels)]
        parts = []
        for v, i in zip(eqn.invars, ins):
            k = v.aval.shape[-1]
            parts.append(i.labels if isinstance(i, _Data) else
                         np.full(k, ZERO) if i.zero else self.fresh(k, pinned=True))
        return [_Data(np.concatenate(parts).astype(int))]

    def _conv(self, eqn, ins: list) -> list:
        lhs, rhs = ins
        lhs_shape, k_shape = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
        nd = len(lhs_shape)
        dn = eqn.params["dimension_numbers"]
        g = eqn.params["feature_group_count"]
        cin, cout = lhs_shape[-1], k_shape[-1]
        ok = (isinstance(lhs, _Data) and isinstance(rhs, _Const) and rhs.leaf is not None
              and dn.lhs_spec[1] == nd - 1 and dn.out_spec[1] == nd - 1
              and dn.rhs_spec[0] == nd - 1 and dn.rhs_spec[1] == nd - 2
              and eqn.params["batch_group_count"] == 1)
        kind = "conv" if g == 1 else "depthwise" if (g == cin == cout and k_shape[-2] == 1) \
            else None
        if not ok or kind is None:
            return self._opaque(eqn, ins)
        out = self.fresh(cout, writer=rhs.leaf)
        self._add_layer(rhs.leaf, kind, lhs.labels, out)
        return [_Data(out)]

    def _dot(self, eqn, ins: list) -> list:
        lhs, rhs = ins
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs_nd = len(eqn.invars[0].aval.shape)
        k_shape = eqn.invars[1].aval.shape
        if not (isinstance(lhs, _Data) and isinstance(rhs, _Const) and rhs.leaf is not None
                and len(k_shape) == 2 and tuple(lc) == (lhs_nd - 1,) and tuple(rc) == (0,)
                and not lb and not rb):
            return self._opaque(eqn, ins)
        out = self.fresh(k_shape[1], writer=rhs.leaf)
        self._add_layer(rhs.leaf, "dense", lhs.labels, out)
        return [_Data(out)]

    def _add_layer(self, leaf: str, kind: str, in_labels, out_labels) -> None:
        if leaf in self.layers:  # a shared kernel: its channels are one
            old = self.layers[leaf]
            old.in_labels = self.union_labels(old.in_labels, in_labels)
            old.out_labels = self.union_labels(old.out_labels, out_labels)
        else:
            self.layers[leaf] = _Layer(kind, np.asarray(in_labels), np.asarray(out_labels))
        if kind == "depthwise":
            self._record_axis(leaf, 3, out_labels)
        else:
            in_axis, out_axis = (2, 3) if kind == "conv" else (0, 1)
            self._record_axis(leaf, in_axis, in_labels)
            self._record_axis(leaf, out_axis, out_labels)


def channel_flow(model: nn.Module, variables: dict, sample_shape: Sequence[int]
                 ) -> tuple[ChannelFlow, dict[str, tuple]]:
    """Follow the channels of one abstract eval pass; also returns, per module path, the
    (unbound module, input shape, input dtype) of its first call."""
    paths = masks_lib.tree_paths(variables)
    leaves = jax.tree_util.tree_leaves(variables)
    treedef = jax.tree_util.tree_structure(variables)
    shapes = {p: tuple(np.shape(x)) for p, x in zip(paths, leaves)}
    calls: dict[str, tuple] = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and args and hasattr(args[0], "shape"):
            path = "/".join(context.module.path)
            if path not in calls:
                calls[path] = (context.module.clone(parent=None), tuple(args[0].shape),
                               args[0].dtype)
        return next_fun(*args, **kwargs)

    def fn(leaves, x):
        with nn.intercept_methods(record):
            return model.apply(jax.tree_util.tree_unflatten(treedef, leaves), x, train=False)

    abstract = [jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) for x in leaves]
    closed = jax.make_jaxpr(fn)(abstract, jax.ShapeDtypeStruct((1, *sample_shape), jnp.float32))
    flow = ChannelFlow(shapes)
    infos = [_Const(leaf=p, channel_leaves=frozenset([p]) if len(s) == 1 else frozenset())
             for p, s in shapes.items()]
    x_aval = closed.jaxpr.invars[-1].aval
    infos.append(_Data(flow.fresh(x_aval.shape[-1], pinned=True)))
    for out in flow.run(closed.jaxpr, infos, closed.consts):
        if isinstance(out, _Data):
            flow.pin(out.labels)
    return flow, calls


def _zero_responses(calls: dict, variables: dict, modules: set[str]) -> dict[str, np.ndarray]:
    """Per module: bool[C], True where the module maps an all-zero input to exactly 0.

    The modules are per-channel (BatchNorm, conv biases), so a 1x1 input suffices; a module
    refusing it gets its recorded input shape. All are evaluated in one compiled call.
    """
    jobs = {}
    for path in sorted(modules):
        if path not in calls:
            continue
        module, shape, dtype = calls[path]
        sub = {}
        for col, tree in variables.items():
            node = tree
            for key in filter(None, path.split("/")):
                node = node.get(key) if isinstance(node, dict) else None
            if node is not None:
                sub[col] = node
        for trial in ((1,) * (len(shape) - 1) + shape[-1:], (1, *shape[1:])):
            x = jax.ShapeDtypeStruct(trial, dtype)
            try:
                jax.eval_shape(module.apply, sub, x)
            except Exception:  # a module that needs its real spatial shape
                continue
            jobs[path] = (module, sub, x)
            break

    def run(subs):
        return {p: m.apply(subs[p], jnp.zeros(x.shape, x.dtype)) for p, (m, _, x) in jobs.items()}

    outs = jax.jit(run)({p: sub for p, (_, sub, _) in jobs.items()})
    return {p: np.all(np.asarray(y).reshape(-1, y.shape[-1]) == 0, axis=0)
            for p, y in outs.items() if np.ndim(y)}


# --------------------------------------------------------------------------- decision

@dataclasses.dataclass
class _Plan:
    keep: dict[str, dict[int, np.ndarray]]   # leaf -> axis -> kept positions
    removed_units: set
    approx_only: int                          # channels removed only because approximate
    dead_kept: int                            # pruned writer channels that had to stay


def _live(mask: Optional[np.ndarray], shape: tuple, kind: str) -> np.ndarray:
    """conv/dense: [in, out] bool, input i has kept weights for output c; depthwise: [out]."""
    m = np.ones(shape, bool) if mask is None else np.asarray(mask, bool)
    if kind == "conv":
        return m.reshape(-1, *m.shape[-2:]).any(axis=0)
    if kind == "depthwise":
        return m.reshape(-1, m.shape[-1]).any(axis=0)
    return m


def _decide(flow: ChannelFlow, kernel_masks: dict, shapes: dict, responses: dict,
            approximate: bool, round_to: int = 1) -> _Plan:
    find = flow.find
    n_nodes = len(flow.parent)
    pinned = {find(n) for n in flow.pinned}
    writers: dict[int, list] = defaultdict(list)
    for n, w in flow.writer.items():
        writers[find(n)].append(w)
    constant = set()  # groups with a per-channel module that does not map 0 to 0
    for module, labels in flow.modules:
        resp = responses.get(module)
        for c, lab in enumerate(labels):
            if lab != ZERO and (resp is None or c >= len(resp) or not resp[c]):
                constant.add(find(int(lab)))
    live = {leaf: _live(kernel_masks.get(leaf), shapes[leaf], layer.kind)
            for leaf, layer in flow.layers.items()}
    used = set()
    for leaf, layer in flow.layers.items():
        if layer.kind == "depthwise":
            continue  # coupled with its output channel: removed together, see units
        reads = live[leaf].any(axis=1)
        used.update(find(int(lab)) for lab, r in zip(layer.in_labels, reads) if r and lab != ZERO)

    # Units: groups that must go together (a depthwise conv's input and output channel).
    unit = list(range(n_nodes))

    def ufind(a):
        while unit[a] != a:
            unit[a] = unit[unit[a]]
            a = unit[a]
        return a
    for layer in flow.layers.values():
        if layer.kind != "depthwise":
            continue
        for a, b in zip(layer.in_labels, layer.out_labels):
            if a == ZERO:
                pinned.add(find(int(b)))
            else:
                unit[ufind(find(int(b)))] = ufind(find(int(a)))

    groups = {find(n) for n in range(n_nodes)}

    def zero_groups(ignore_constants: bool) -> set:
        zero: set = set()
        while True:
            dead = {}
            for leaf, layer in flow.layers.items():
                in_zero = np.asarray([lab == ZERO or find(int(lab)) in zero
                                      for lab in layer.in_labels])
                if layer.kind == "depthwise":
                    d = ~live[leaf] | in_zero
                else:
                    d = ~(live[leaf] & ~in_zero[:, None]).any(axis=0)
                dead.update({(leaf, c): bool(x) for c, x in enumerate(d)})
            new = {g for g in groups - zero - pinned
                   if writers[g] and all(dead[w] for w in writers[g])
                   and (ignore_constants or g not in constant)}
            if not new:
                return zero
            zero |= new

    def removable(zero: set) -> set:
        members: dict[int, list] = defaultdict(list)
        for g in groups:
            members[ufind(g)].append(g)
        return {u for u, gs in members.items()
                if not any(g in pinned for g in gs)
                and all(g in zero or g not in used for g in gs)}

    exact = removable(zero_groups(False))
    removed = set(removable(zero_groups(True)) if approximate else exact)
    # Keep some removable channels (exact either way): at least one per layer (a layer of
    # width 0 cannot be built), and widths rounded up to multiples of round_to.
    changed = True
    while changed:
        changed = False
        for layer in flow.layers.values():
            units = [ufind(find(int(lab))) for lab in layer.out_labels]
            width = sum(u not in removed for u in units)
            need = min(len(units), -(-max(width, 1) // round_to) * round_to) - width
            for u in units:
                if need <= 0:
                    break
                if u in removed:
                    removed.discard(u)
                    need -= units.count(u)
                    changed = True

    def kept(lab) -> bool:
        return lab == ZERO or ufind(find(int(lab))) not in removed

    keep = {leaf: {axis: np.asarray([kept(lab) for lab in labels], bool)
                   for axis, labels in axes.items()} for leaf, axes in flow.axes.items()}
    approx_only = dead_kept = 0
    for layer in flow.layers.values():
        for lab in layer.out_labels:
            u = ufind(find(int(lab)))
            approx_only += int(u in removed and u not in exact)
    for leaf, layer in flow.layers.items():
        m = kernel_masks.get(leaf)
        if m is None:
            continue
        pruned = ~np.asarray(m, bool).reshape(-1, np.shape(m)[-1]).any(axis=0)
        dead_kept += int(sum(p and kept(lab) for p, lab in zip(pruned, layer.out_labels)))
    return _Plan(keep, removed, approx_only, dead_kept)


# --------------------------------------------------------------------------- rebuild

Rebuilder = Callable[[nn.Module, dict, dict], nn.Module]
_REBUILDERS: dict[type, Rebuilder] = {}


def register_rebuild(cls: type) -> Callable[[Rebuilder], Rebuilder]:
    """Decorator: ``fn(model, shapes, keep) -> narrower model`` for networks of class ``cls``.

    ``shapes`` maps 'params/...' paths to the compact variables' shapes; ``keep`` maps a
    variable path to {axis: bool array of kept original positions}.
    """
    def decorator(fn: Rebuilder) -> Rebuilder:
        _REBUILDERS[cls] = fn
        return fn
    return decorator


def _width(shapes: dict, module: str) -> int:
    return int(shapes[f"params/{module}/kernel"][-1])


def _block_names(num_blocks: Sequence[int]) -> list[str]:
    return [f"layer{s}_{b}" for s, n in enumerate(num_blocks, start=1) for b in range(n)]


def _option_a_map(in_keep: np.ndarray, out_keep: np.ndarray, features: int) -> tuple:
    """Compact option-A shortcut: for each kept output channel, the compact index of the
    input channel the standard zero-padding puts there, or -1 for a padded zero."""
    from rsst_jax.nets.resnet_cifar import pad_shortcut
    ids = jnp.arange(1, len(in_keep) + 1, dtype=jnp.float32).reshape(1, 1, 1, -1)
    src = np.asarray(pad_shortcut(ids, features, 1)).reshape(-1).astype(int) - 1
    rank = np.cumsum(in_keep) - 1
    out = []
    for j in np.flatnonzero(out_keep):
        i = src[j]
        if i >= 0 and not in_keep[i]:
            raise RuntimeError("option-A shortcut: a kept output channel reads a removed input")
        out.append(int(rank[i]) if i >= 0 else -1)
    return tuple(out)


@register_rebuild(nets.ResNetCifar)
def _rebuild_resnet_cifar(model, shapes, keep):
    names = _block_names(model.num_blocks)
    maps = None
    if model.shortcut == "A":
        stage = [w for w, n in zip(model.widths, model.num_blocks) for _ in range(n)]
        maps = tuple(_option_a_map(keep[f"params/{n}/conv1/kernel"][2],
                                   keep[f"params/{n}/conv2/kernel"][3], w)
                     for n, w in zip(names, stage))
    return model.clone(stem_features=_width(shapes, "conv1"),
                       block_widths=tuple((_width(shapes, f"{n}/conv1"),
                                           _width(shapes, f"{n}/conv2")) for n in names),
                       shortcut_maps=maps)


@register_rebuild(nets.ResNet)
def _rebuild_resnet(model, shapes, keep):
    convs = ("conv1", "conv2", "conv3") if model.bottleneck else ("conv1", "conv2")
    return model.clone(stem_features=_width(shapes, "conv1"),
                       block_widths=tuple(tuple(_width(shapes, f"{n}/{c}") for c in convs)
                                          for n in _block_names(model.num_blocks)))


@register_rebuild(nets.VGG)
def _rebuild_vgg(model, shapes, keep):
    widths = iter(_width(shapes, f"features_conv{i}") for i in range(len(model.cfg)))
    return model.clone(cfg=tuple("M" if item == "M" else next(widths) for item in model.cfg))


@register_rebuild(nets.MobileNet)
def _rebuild_mobilenet(model, shapes, keep):
    cfg = []
    for i, item in enumerate(model.cfg):
        w = _width(shapes, f"block{i}/conv_pw")
        cfg.append((w, item[1]) if isinstance(item, tuple) else w)
    return model.clone(stem_features=_width(shapes, "conv1"), cfg=tuple(cfg))


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
    families = {cls.__name__: cls for cls in _REBUILDERS}
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
      masks: a weight mask tree (or one merged with ``bn_masks``); applied to ``params``.
      approximate: also remove pruned channels whose BatchNorm still adds a constant
        (not exact: measure the error against the masked network).
      sample_shape: one image's ``(H, W, C)``; default ``(32, 32, C_in of the stem)``.
      round_to: keep some removable channels so that widths are multiples of this where
        possible (e.g. 8: XLA's CPU convolutions are much slower on other widths); the
        kept extra channels are zero or unread, so this never changes the result.

    Returns:
      ``(compact_model, compact_variables, description)``. In eval mode the compact
      network's logits equal those of ``masked_variables(variables, masks)`` up to float
      rounding (unless approximate removals happened: ``description['exact']``).
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
    if type(model) not in _REBUILDERS:
        raise ValueError(f"no compaction rebuilder for {type(model).__name__}; register one "
                         f"with rsst_jax.compact.register_rebuild")
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
    responses = _zero_responses(calls, masked, {m for m, _ in flow.modules})
    plan = _decide(flow, kernel_masks, shapes, responses, approximate, round_to)

    compact_flat = {}
    for path, leaf in flat_vars.items():
        arr = np.asarray(leaf)
        for axis, kept in plan.keep.get(path, {}).items():
            if not kept.all():
                arr = np.compress(kept, arr, axis=axis)
        compact_flat[path] = jnp.asarray(arr)
    compact_vars = unflatten_dict({tuple(p.split("/")): v for p, v in compact_flat.items()})
    new_shapes = {p: tuple(v.shape) for p, v in compact_flat.items()}
    compact_model = _REBUILDERS[type(model)](model, new_shapes, plan.keep)

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
        "unfollowed_ops": sorted(set(flow.opaque)),
    }
    return compact_model, compact_vars, description


# --------------------------------------------------------------------------- counting

def count_params(params: PyTree) -> int:
    """Number of scalars in the array leaves of ``params`` (None leaves count 0)."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def _layer_positions(model, variables, sample_shape) -> dict[str, tuple[int, tuple]]:
    """Module path -> (output positions per image, kernel shape) for modules with a kernel."""
    flat = masks_lib.flat_dict(variables.get("params", {}))
    out: dict[str, tuple[int, tuple]] = {}
    for c in _trace_calls(model, sample_shape, variables)[0]:
        kernel = flat.get(_join(c.path, "kernel"))
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
            m = mflat.get(_join(path, "kernel"))
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
    pruned = sum(int(np.size(m) - np.sum(np.asarray(m)))
                 for m in jax.tree_util.tree_leaves(masks))
    kernel_masks = [m for p, m in masks_lib.flat_dict(masks).items()
                    if m is not None and p.endswith("kernel") and np.ndim(m) >= 2]
    compact_params = count_params(cvars["params"])
    return {
        "params": params, "macs": dense["macs"], "flops": dense["flops"],
        "masked_params": params - pruned, "masked_macs": dense["masked_macs"],
        "masked_flops": dense["masked_flops"],
        "compact_params": compact_params, "compact_macs": small["macs"],
        "compact_flops": small["flops"],
        "param_ratio": compact_params / params if params else 1.0,
        "flop_ratio": small["macs"] / dense["macs"] if dense["macs"] else 1.0,
        "channels": desc["prunable_channels"], "channels_kept": desc["prunable_channels_kept"],
        "channel_sparsity": masks_lib.channel_sparsity(kernel_masks),
        "pruned_channels_kept": desc["pruned_channels_kept"], "exact": desc["exact"],
    }


class _CallableModule(types.ModuleType):
    """``rsst_jax.compact(net, variables, masks)`` calls ``compact``; the module's other
    names (``bn_masks``, ``count_flops``, ...) stay reachable as attributes."""

    def __call__(self, *args, **kwargs):
        return compact(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
