"""Channel flow: which channels of a network can go, read from one jaxpr, no layer names.

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
   ``ChannelGraph`` holds the union-find over nodes and what was recorded about them;
   ``ChannelFlow`` fills it, one handler per kind of primitive.
2. **Decision** (``decide_removal``). A group goes when its value is exactly zero for
   every input -- each writer's kernel channel is pruned (or reads only zero channels) and
   every per-channel module applied on the way maps 0 to 0 (``zero_responses``), which for
   BatchNorm means zero scale and bias (``--mask_bn``, see ``rsst_jax.model_masks.bn_masks``)
   -- or when nothing reads it (every reader's weights for it are pruned).
   ``approximate=True`` drops the "maps 0 to 0" condition: a pruned channel whose
   BatchNorm still adds a constant is removed anyway and the caller measures the error. A
   depthwise conv's input channel and output channel go together. Every layer keeps at
   least one channel, and ``round_to`` keeps removable (zero or unread) channels so that
   widths are multiples of it, for hardware that wants aligned widths.

The result is, per variable, a bool array of kept positions along each sliceable axis;
``rsst_jax.compact`` slices and rebuilds. Nothing here prints or touches files.
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from rsst_jax import masks as masks_lib

__all__ = ["ZERO", "Layer", "ChannelGraph", "ChannelFlow", "channel_flow", "zero_responses",
           "RemovalPlan", "decide_removal"]

ZERO = -1  # label of a channel that is a constant zero (e.g. the padding of a shortcut)


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
class Layer:
    """A conv/dense kernel's input and output channel labels."""
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


class ChannelGraph:
    """Union-find over channel nodes and what is recorded about them while a flow is followed.

    ``layers`` maps each conv/dense kernel path to its input/output channel labels;
    ``axes[leaf][axis]`` the labels along each sliceable axis of a variable; ``modules``
    the (module path, labels) of per-channel variables applied to channels; ``pinned`` the
    nodes that must stay (network input and output, unfollowed ops); ``writer[node]`` the
    (kernel path, output channel) that starts a node; ``opaque`` the ops not followed.
    """

    def __init__(self):
        self.parent: list[int] = []
        self.pinned: set[int] = set()
        self.writer: dict[int, tuple[str, int]] = {}
        self.layers: dict[str, Layer] = {}
        self.axes: dict[str, dict[int, np.ndarray]] = {}
        self.modules: list[tuple[str, np.ndarray]] = []
        self.opaque: list[str] = []

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

    def record_axis(self, leaf: str, axis: int, labels: np.ndarray) -> None:
        have = self.axes.setdefault(leaf, {})
        if axis in have:
            if len(have[axis]) != len(labels):
                self.pin(labels), self.pin(have[axis])
                return
            have[axis] = self.union_labels(have[axis], labels)
        else:
            have[axis] = np.asarray(labels)

    def add_layer(self, leaf: str, kind: str, in_labels, out_labels) -> None:
        if leaf in self.layers:  # a shared kernel: its channels are one
            old = self.layers[leaf]
            old.in_labels = self.union_labels(old.in_labels, in_labels)
            old.out_labels = self.union_labels(old.out_labels, out_labels)
        else:
            self.layers[leaf] = Layer(kind, np.asarray(in_labels), np.asarray(out_labels))
        if kind == "depthwise":
            self.record_axis(leaf, 3, out_labels)
        else:
            in_axis, out_axis = (2, 3) if kind == "conv" else (0, 1)
            self.record_axis(leaf, in_axis, in_labels)
            self.record_axis(leaf, out_axis, out_labels)


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


def _window_keeps_channels(eqn) -> bool:
    p = eqn.params
    ok = p["window_dimensions"][-1] == 1 and p["window_strides"][-1] == 1 \
        and tuple(p["padding"][-1]) == (0, 0)
    for key in ("base_dilation", "window_dilation"):
        ok = ok and (key not in p or p[key][-1] == 1)
    return ok


def _const(eqn, ins: list, aval, leaf_shapes: dict[str, tuple]) -> _Const:
    """What is known about an op's output computed from variables and literals only."""
    name = eqn.primitive.name
    last = aval.shape[-1] if aval.shape else None
    leaf = ins[0].leaf if name in ("convert_element_type", "copy", "copy_p") else None
    leaves: set = set()
    if name in _SHAPE_OPS:
        if _keeps_last_axis(eqn):
            leaves = set(ins[0].channel_leaves)
    elif name in _BINARY or name in _UNARY_ZERO or name in ("rsqrt", "exp", "log",
                                                            "integer_pow", "pow", "logistic"):
        leaves = set().union(*(i.channel_leaves for i in ins if isinstance(i, _Const)))
    leaves = {lf for lf in leaves if last is not None and leaf_shapes[lf] == (last,)}
    if name == "mul":
        zero = any(i.zero for i in ins)
    elif name in ("add", "sub", "max", "min", "convert_element_type", "neg") \
            or name in _SHAPE_OPS:
        zero = all(i.zero for i in ins)
    else:
        zero = False
    return _Const(leaf=leaf, channel_leaves=frozenset(leaves), zero=zero)


def _conv_kind(eqn, ins: list) -> Optional[str]:
    """'conv' or 'depthwise' for an NHWC convolution of data by a kernel variable whose
    channels can be followed, else None."""
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
    return kind if ok else None


def _dense_kind(eqn, ins: list) -> Optional[str]:
    """'dense' for data times a 2-D kernel variable over the last axis, else None."""
    lhs, rhs = ins
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs_nd = len(eqn.invars[0].aval.shape)
    k_shape = eqn.invars[1].aval.shape
    ok = (isinstance(lhs, _Data) and isinstance(rhs, _Const) and rhs.leaf is not None
          and len(k_shape) == 2 and tuple(lc) == (lhs_nd - 1,) and tuple(rc) == (0,)
          and not lb and not rb)
    return "dense" if ok else None


class ChannelFlow(ChannelGraph):
    """A ``ChannelGraph`` filled by following one jaxpr (see the module docstring): ``run``
    walks the equations, each primitive's handler moves or merges channel labels.

    ``leaf_sizes`` maps each variable path to its shape; the inputs of ``run`` are ``_Const``
    for variables and ``_Data`` (labels per channel) for values computed from the image.
    """

    def __init__(self, leaf_sizes: dict[str, tuple]):
        super().__init__()
        self._shapes = leaf_sizes

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
            return [_const(eqn, ins, v.aval, self._shapes) for v in eqn.outvars]
        out_aval = eqn.outvars[0].aval
        if name == "conv_general_dilated":
            return self._layer(eqn, ins, _conv_kind(eqn, ins))
        if name == "dot_general":
            return self._layer(eqn, ins, _dense_kind(eqn, ins))
        if name in _UNARY_ZERO or (name == "integer_pow" and eqn.params["y"] > 0):
            return [ins[0]]
        if name in _BINARY or name == "select_n":
            return self._elementwise(eqn, ins, out_aval)
        if name in _SHAPE_OPS and _keeps_last_axis(eqn):
            return [ins[0]]
        if name in _REDUCE and (len(eqn.invars[0].aval.shape) - 1) not in eqn.params["axes"]:
            return [ins[0]]
        if name in _WINDOW and len(ins) == 1 and _window_keeps_channels(eqn):
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
                self.record_axis(lf, 0, labels)
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

    def _layer(self, eqn, ins: list, kind: Optional[str]) -> list:
        """A conv or dense layer: its output channels are new nodes written by its kernel."""
        if kind is None:
            return self._opaque(eqn, ins)
        lhs, rhs = ins
        out = self.fresh(eqn.invars[1].aval.shape[-1], writer=rhs.leaf)
        self.add_layer(rhs.leaf, kind, lhs.labels, out)
        return [_Data(out)]


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


def zero_responses(calls: dict, variables: dict, modules: set[str]) -> dict[str, np.ndarray]:
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
class RemovalPlan:
    """What ``decide_removal`` decided; ``keep`` is what ``rsst_jax.compact`` slices by."""
    keep: dict[str, dict[int, np.ndarray]]   # leaf -> axis -> kept positions
    removed_units: set
    approx_only: int                          # channels removed only because approximate
    dead_kept: int                            # pruned writer channels that had to stay
    # Why they stay, by count: 'shared' (another layer writes live values into the same
    # channel, e.g. a residual stream), 'constant' (a module on the way, e.g. a BatchNorm
    # whose scale or bias is not zero, adds a constant), 'width' (kept so that a layer
    # keeps one channel, or for round_to), 'pinned' (an op the flow cannot follow).
    dead_kept_reasons: dict = dataclasses.field(default_factory=dict)


def _live(mask: Optional[np.ndarray], shape: tuple, kind: str) -> np.ndarray:
    """conv/dense: [in, out] bool, input i has kept weights for output c; depthwise: [out]."""
    m = np.ones(shape, bool) if mask is None else np.asarray(mask, bool)
    if kind == "conv":
        return m.reshape(-1, *m.shape[-2:]).any(axis=0)
    if kind == "depthwise":
        return m.reshape(-1, m.shape[-1]).any(axis=0)
    return m


def decide_removal(flow: ChannelFlow, kernel_masks: dict, shapes: dict, responses: dict,
                   approximate: bool, round_to: int = 1) -> RemovalPlan:
    """Which channel groups go (module docstring, 2.). ``kernel_masks`` maps 'params/...'
    kernel paths to bool masks, ``shapes`` every variable path to its shape, ``responses``
    is what ``zero_responses`` returned for the modules of ``flow``."""
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

    zero_exact, zero_loose = zero_groups(False), zero_groups(True)
    exact = removable(zero_exact)
    removed = set(removable(zero_loose) if approximate else exact)
    candidates = set(removed)
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
    reasons: dict[str, int] = defaultdict(int)
    for leaf, layer in flow.layers.items():
        m = kernel_masks.get(leaf)
        if m is None:
            continue
        pruned = ~np.asarray(m, bool).reshape(-1, np.shape(m)[-1]).any(axis=0)
        for p, lab in zip(pruned, layer.out_labels):
            if not (p and kept(lab)):
                continue
            dead_kept += 1
            g = find(int(lab))
            if ufind(g) in candidates:
                reasons["width"] += 1       # removable, kept for the width rules
            elif g in pinned:
                reasons["pinned"] += 1
            elif g in zero_loose:
                reasons["constant"] += 1    # zero but for a constant added on the way
            else:
                reasons["shared"] += 1      # another writer's live values flow in
    return RemovalPlan(keep, removed, approx_only, dead_kept, dict(reasons))

