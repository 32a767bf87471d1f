"""Pretrained weights in our layout: rsst-jax checkpoints, PyTorch state_dicts, ``.npz`` files.

``load_pretrained(path, template_variables)`` returns ``{'params', 'batch_stats'}`` with
the structure of ``template_variables``: every leaf the file provides with the same
path and shape is taken from it; the classifier (when the class count differs) and
the stem conv (when its shape differs, e.g. torchvision's 7x7 ImageNet stem against
our 3x3 CIFAR stem) keep the template's fresh values. Any other mismatch is an error.

PyTorch names are mapped by ``convert_state_dict`` (torchvision's ``resnet18``,
``resnet50`` and ``vgg16_bn``; also CIFAR ResNets named like them, e.g. ``res20s``,
and kuangliu-style ``shortcut.*``/``linear.*`` names):

==================================  ==========================================
PyTorch                             rsst-jax
==================================  ==========================================
``conv1.weight`` (O, I, kh, kw)     ``params/conv1/kernel`` (kh, kw, I, O)
``bn1.weight`` / ``bn1.bias``       ``params/bn1/scale`` / ``params/bn1/bias``
``bn1.running_mean`` / ``_var``     ``batch_stats/bn1/mean`` / ``var``
``layer{s}.{b}.conv{i}``            ``layer{s}_{b}/conv{i}``
``layer{s}.{b}.downsample.0`` / 1   ``layer{s}_{b}/shortcut_conv`` / ``shortcut_bn``
``fc.weight`` (out, in), ``bias``   ``params/fc/kernel`` (in, out), ``bias``
``features.{k}`` (VGG, k-th module) ``features_conv{i}`` / ``features_bn{i}`` (i-th conv)
``classifier[.{k}]`` (last Linear)  ``classifier`` (torchvision's two hidden
                                    Linear layers are dropped: our VGG has one)
==================================  ==========================================

Our convs have no bias; a VGG conv bias (followed by BatchNorm) is folded exactly into
the BatchNorm's running mean (``mean - bias``). ``num_batches_tracked`` is dropped;
``X.weight_orig`` times ``X.weight_mask`` (``torch.nn.utils.prune``) becomes ``X.weight``;
a ``module.`` prefix (DataParallel) and a ``{'state_dict': ...}`` wrapper are removed.

torch is not a dependency: it is imported only to read ``.pt``/``.pth`` files.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Mapping
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from rsst_jax import checkpoint as ckpt
from rsst_jax import masks as masks_lib
from rsst_jax import tickets

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".tar")


class PretrainedError(ValueError):
    """Weights that cannot be read or do not fit the network; the message says why."""


# --------------------------------------------------------------------------- reading


def read_torch_file(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """A PyTorch state_dict file as float32/int numpy arrays (needs torch installed)."""
    try:
        import torch  # start-up: optional (not a dependency), seconds; PyTorch files only
    except ImportError:
        raise PretrainedError(
            f"reading the PyTorch file {path} needs torch, which rsst-jax does not install: "
            f"pip install torch (CPU wheels suffice), or save the state_dict as .npz where torch "
            f"is installed: np.savez(f, **{{k: v.numpy() for k, v in sd.items()}})") from None
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except TypeError:  # torch < 1.13 has no weights_only
            obj = torch.load(str(path), map_location="cpu")
    except Exception as e:  # torch raises many types for corrupt or foreign files
        raise PretrainedError(f"torch cannot read {path}: {e.__class__.__name__}: "
                              f"{str(e).splitlines()[0][:200]}") from None
    obj = _unwrap(obj, path)
    out = {}
    for k, v in obj.items():
        if hasattr(v, "detach"):
            v = v.detach().cpu()
            if v.is_floating_point():
                v = v.float()  # bfloat16/float16 have no numpy equivalent everywhere
            out[k] = v.numpy()
    return out


def _unwrap(obj: Any, path) -> Mapping:
    """The state_dict inside a training checkpoint dict ({'state_dict': ...} etc.)."""
    for key in ("state_dict", "model_state_dict", "model", "net"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise PretrainedError(f"{path} holds a {type(obj).__name__}, not a state_dict (a mapping "
                              f"of parameter names to tensors); save model.state_dict()")
    return obj


def read_npz(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """A state_dict saved with ``np.savez`` (PyTorch names as keys)."""
    try:
        with np.load(str(path), allow_pickle=False) as f:
            return {k: np.asarray(f[k]) for k in f.files}
    except Exception as e:
        raise PretrainedError(f"cannot read {path} as .npz: {e.__class__.__name__}: {e}") from None


# --------------------------------------------------------------------------- names


def _clean(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Strip 'module.', merge pruning reparametrizations, drop num_batches_tracked."""
    sd = {}
    for k, v in state_dict.items():
        k = k[len("module."):] if k.startswith("module.") else k
        sd[k] = np.asarray(v)
    for k in [k for k in sd if k.endswith("_orig")]:
        base = k[: -len("_orig")]
        mask = sd.pop(base + "_mask", None)
        value = sd.pop(k)
        sd[base] = value if mask is None else value * mask
    return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}


_BN_FIELDS = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def _is_vgg(keys) -> bool:
    return any(k.startswith("features.") for k in keys)


def _resnet_module(name: str) -> Optional[str]:
    """Our module path for a torch ResNet module name, None if it is not one."""
    m = re.fullmatch(r"layer(\d+)\.(\d+)\.(.+)", name)
    if m:
        inner = m.group(3)
        inner = {"downsample.0": "shortcut_conv", "downsample.1": "shortcut_bn",
                 "shortcut.0": "shortcut_conv", "shortcut.1": "shortcut_bn"}.get(inner, inner)
        if not re.fullmatch(r"(conv\d+|bn\d+|shortcut_conv|shortcut_bn)", inner):
            return None
        return f"layer{m.group(1)}_{m.group(2)}/{inner}"
    if name in ("conv1", "bn1"):
        return name
    if name in ("fc", "linear"):
        return "fc"
    return None


def _put(out: dict, collection: str, module: str, leaf: str, value: np.ndarray, source: str,
         sources: dict) -> None:
    node = out.setdefault(collection, {})
    for part in module.split("/"):
        node = node.setdefault(part, {})
    node[leaf] = value
    sources[f"{collection}/{module}/{leaf}"] = source


def _put_torch_leaf(out, module: str, field: str, value: np.ndarray, key: str, sources) -> bool:
    """Place one torch tensor of a conv, BN or linear module; False if the field is unknown."""
    if field == "weight" and value.ndim == 4:          # conv OIHW -> HWIO
        _put(out, "params", module, "kernel", np.transpose(value, (2, 3, 1, 0)), key, sources)
    elif field == "weight" and value.ndim == 2:        # linear (out, in) -> (in, out)
        _put(out, "params", module, "kernel", np.transpose(value), key, sources)
    elif field == "bias" and module.rsplit("/", 1)[-1] in ("fc", "classifier"):
        _put(out, "params", module, "bias", value, key, sources)
    elif field in _BN_FIELDS and value.ndim == 1:
        collection, leaf = _BN_FIELDS[field]
        _put(out, collection, module, leaf, value, key, sources)
    else:
        return False
    return True


@dataclasses.dataclass
class Conversion:
    """Result of ``convert_state_dict``: the variables and what happened to each key."""
    variables: dict                      # {'params': ..., 'batch_stats': ...} of numpy arrays
    sources: dict                        # 'params/conv1/kernel' -> 'conv1.weight'
    dropped: list                        # torch keys deliberately not used, with the reason


def convert_state_dict(state_dict: Mapping[str, Any]) -> Conversion:
    """torchvision-named ResNet or VGG-BN state_dict -> our ``{'params', 'batch_stats'}``.

    Pure numpy; raises ``PretrainedError`` naming the first keys it cannot place.
    """
    sd = _clean(state_dict)
    if not sd:
        raise PretrainedError("the state_dict is empty")
    out: dict = {}
    sources: dict = {}
    dropped: list = []
    unknown: list = []
    if _is_vgg(sd):
        _convert_vgg(sd, out, sources, dropped, unknown)
    else:
        for key, value in sd.items():
            module, _, field = key.rpartition(".")
            ours = _resnet_module(module)
            if ours is None or not _put_torch_leaf(out, ours, field, value, key, sources):
                unknown.append(key)
    if unknown:
        raise PretrainedError(
            f"{len(unknown)} parameter name(s) have no place in rsst-jax's ResNet/VGG-BN layout, "
            f"e.g. {', '.join(unknown[:4])} (expected torchvision names such as "
            f"layer1.0.conv1.weight or features.0.weight)")
    return Conversion(variables=out, sources=sources, dropped=dropped)


def _convert_vgg(sd, out, sources, dropped, unknown) -> None:
    """features.{k}: the i-th 4-D weight is features_conv{i}, the BN after it features_bn{i}."""
    modules: dict[int, dict[str, np.ndarray]] = {}
    linears: dict[Optional[int], dict[str, np.ndarray]] = {}
    for key, value in sd.items():
        m = re.fullmatch(r"features\.(\d+)\.(\w+)", key)
        c = re.fullmatch(r"classifier(?:\.(\d+))?\.(weight|bias)", key)
        if m:
            modules.setdefault(int(m.group(1)), {})[m.group(2)] = (key, value)
        elif c:
            linears.setdefault(None if c.group(1) is None else int(c.group(1)), {})[c.group(2)] = (key, value)
        else:
            unknown.append(key)
    conv_i, pending_bias = -1, None
    for idx in sorted(modules):
        fields = modules[idx]
        if "weight" in fields and fields["weight"][1].ndim == 4:
            if pending_bias is not None:
                raise PretrainedError(f"{pending_bias[0]}: a conv bias with no BatchNorm after it "
                                      f"(plain VGG, not VGG-BN); rsst-jax convs have no bias")
            conv_i += 1
            key, w = fields.pop("weight")
            _put_torch_leaf(out, f"features_conv{conv_i}", "weight", w, key, sources)
            pending_bias = fields.pop("bias", None)
            unknown.extend(k for k, _ in fields.values())
        elif "running_mean" in fields:
            if conv_i < 0:
                unknown.extend(k for k, _ in fields.values())
                continue
            if pending_bias is not None:  # BN(conv(x) + b) == BN'(conv(x)) with mean' = mean - b
                key, mean = fields["running_mean"]
                fields["running_mean"] = (f"{key} - {pending_bias[0]}", mean - pending_bias[1])
                pending_bias = None
            for field, (key, value) in fields.items():
                if not _put_torch_leaf(out, f"features_bn{conv_i}", field, value, key, sources):
                    unknown.append(key)
        else:
            unknown.extend(k for k, _ in fields.values())
    if pending_bias is not None:
        raise PretrainedError(f"{pending_bias[0]}: a conv bias with no BatchNorm after it "
                              f"(plain VGG, not VGG-BN); rsst-jax convs have no bias")
    if linears:
        last = max(linears, key=lambda i: -1 if i is None else i)
        for idx, fields in linears.items():
            if idx != last:
                dropped.extend((k, "hidden classifier layer; our VGG has a single linear layer")
                               for k, _ in fields.values())
                continue
            for field, (key, value) in fields.items():
                _put_torch_leaf(out, "classifier", field, value, key, sources)


# --------------------------------------------------------------------------- merging


def _unflat_like(template: Any, values: dict[str, Any], prefix: str = "") -> Any:
    if isinstance(template, Mapping):
        return {k: _unflat_like(v, values, f"{prefix}/{k}" if prefix else str(k))
                for k, v in template.items()}
    return values[prefix]


@dataclasses.dataclass
class MergeReport:
    loaded: list          # paths taken from the file
    fresh: list           # (path, reason) kept from the template
    unused: list          # paths in the file the network does not have

    def summary(self) -> str:
        """One line: counts, the replaced stem/classifier, a few of the missing and unused."""
        def some(paths):
            return ", ".join(paths[:4]) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")

        replaced = [f"{p} ({why})" for p, why in self.fresh if why != "not in the file"]
        missing = [p for p, why in self.fresh if why == "not in the file"]
        text = f"loaded {len(self.loaded)} arrays"
        if replaced:
            text += "; freshly initialized: " + ", ".join(replaced)
        if missing:
            text += f"; {len(missing)} not in the file, kept fresh: {some(missing)}"
        if self.unused:
            text += f"; {len(self.unused)} in the file not used: {some(self.unused)}"
        return text


def _stem_and_head(template_params: Mapping, stem: Optional[str] = None
                   ) -> tuple[Optional[str], set[str]]:
    """'params/<stem>/kernel' and the paths of the last dense layer (kernel and bias)."""
    stem = masks_lib.stem_path(template_params, stem)
    dense = [p for p, v in masks_lib.flat_dict(template_params).items()
             if p.endswith("/kernel") and np.ndim(v) == 2]
    head = set()
    if dense:
        module = dense[-1].rsplit("/", 1)[0]
        head = {f"params/{module}/kernel", f"params/{module}/bias"}
    return (f"params/{stem}" if stem else None), head


def merge_pretrained(template_variables: Mapping, source: Mapping, *, what: str = "pretrained weights",
                     fresh_stem_and_head: bool = False, stem: Optional[str] = None
                     ) -> tuple[dict, MergeReport]:
    """``template_variables`` with every leaf ``source`` has at the same path and shape.

    The stem conv and the classifier stay fresh when their shapes differ (another input
    size or class count), and always with ``fresh_stem_and_head`` (what ``--prune_type
    pt`` does, as the reference: its classifier and stem convolution come from the new
    initialization); a missing leaf stays fresh; any other shape mismatch, or no leaf in
    common at all, raises ``PretrainedError``. ``stem``: the stem kernel's path in
    params (default: the first conv kernel in creation order).
    """
    template = {"params": template_variables["params"],
                "batch_stats": template_variables.get("batch_stats", {})}
    flat_t = masks_lib.flat_dict(template)
    flat_s = masks_lib.flat_dict({"params": source.get("params", {}), "batch_stats": source.get("batch_stats", {})})
    stem, head = _stem_and_head(template["params"], stem)
    loaded, fresh, values = [], [], {}
    for path, t in flat_t.items():
        s = flat_s.get(path)
        if s is None:
            fresh.append((path, "not in the file"))
            values[path] = t
        elif fresh_stem_and_head and (path in head or path == stem):
            fresh.append((path, "classifier, fresh as in the reference" if path in head
                          else "stem, fresh as in the reference"))
            values[path] = t
        elif tuple(np.shape(s)) != tuple(np.shape(t)):
            if path in head or path == stem:
                role = "classifier" if path in head else "stem"
                fresh.append((path, f"{role}: file {tuple(np.shape(s))} vs network {tuple(np.shape(t))}"))
                values[path] = t
            else:
                raise PretrainedError(f"{what} do not fit the network at {path}: shape "
                                      f"{tuple(np.shape(s))}, the network has {tuple(np.shape(t))}")
        else:
            values[path] = jnp.asarray(s, dtype=getattr(t, "dtype", None))
            loaded.append(path)
    if not loaded:
        raise PretrainedError(f"{what} share no parameter with the network (names such as "
                              f"{', '.join(list(flat_s)[:3])}); is it for another architecture?")
    unused = [p for p in flat_s if p not in flat_t]
    return _unflat_like(template, values), MergeReport(loaded, fresh, unused)


# --------------------------------------------------------------------------- entry point


def read_weights(path: str | pathlib.Path) -> tuple[dict, list]:
    """({'params', 'batch_stats'} in our layout, dropped torch keys) from any supported file."""
    p = pathlib.Path(path)
    if not p.exists():
        raise PretrainedError(f"--pretrained {p}: no such file or directory")
    if p.is_dir():
        try:
            arrays, _, _ = tickets.read(p)
        except (tickets.TicketError, ckpt.CheckpointError) as e:
            raise PretrainedError(f"--pretrained {p}: {e}") from None
        return {"params": arrays["params"], "batch_stats": arrays["batch_stats"]}, []
    if p.suffix == ".npz":
        conv = convert_state_dict(read_npz(p))
    elif p.suffix in TORCH_SUFFIXES:
        conv = convert_state_dict(read_torch_file(p))
    else:
        raise PretrainedError(f"--pretrained {p}: expected an rsst-jax checkpoint directory, a "
                              f"PyTorch state_dict ({', '.join(TORCH_SUFFIXES)}) or an .npz of one")
    return conv.variables, conv.dropped


def load_pretrained(path: str | pathlib.Path, template_variables: Mapping, *,
                    with_report: bool = False, fresh_stem_and_head: bool = False,
                    stem: Optional[str] = None):
    """Pretrained ``{'params', 'batch_stats'}`` shaped like ``template_variables``.

    ``path``: an rsst-jax checkpoint (a run directory, ``round_<r>/final``, ``init`` or
    one step folder), a PyTorch state_dict file (needs torch) or an ``.npz`` of one.
    With ``with_report`` returns ``(variables, MergeReport)``; ``fresh_stem_and_head``
    and ``stem`` as in ``merge_pretrained``.
    """
    source, dropped = read_weights(path)
    variables, report = merge_pretrained(template_variables, source, what=f"--pretrained {path}",
                                         fresh_stem_and_head=fresh_stem_and_head, stem=stem)
    report.unused.extend(k for k, _ in dropped)
    return (variables, report) if with_report else variables
