"""He et al. (2016) CIFAR ResNets: 6n+2 layers, three stages of widths 16/32/64.

``shortcut='A'`` (default, as in the paper and akamaster/pytorch_resnet_cifar10) is
parameter-free: subsample by the stride and zero-pad the new channels.
``shortcut='B'`` projects with a 1x1 conv + BN wherever the shape changes.

The optional per-layer widths (``stem_features``, ``block_widths``, ``shortcut_maps``)
describe a network whose pruned channels were physically removed (``rsst_jax.compact``;
``_rebuild`` at the bottom sets them); left at None they give the standard network, with
the same parameter paths either way.
"""
import functools
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from rsst_jax.nets.registry import kernel_width, register_net, register_rebuild
from rsst_jax.nets.layers import batch_norm, classifier_head, conv, resnet_blocks, resnet_stem

SHORTCUTS = ("A", "B")


def pad_shortcut(x: jnp.ndarray, features: int, strides: int) -> jnp.ndarray:
    """Option A: ``x[:, ::s, ::s, :]``, the new zero channels split evenly before and after."""
    x = x[:, ::strides, ::strides, :]
    extra = features - x.shape[-1]
    before = extra // 2
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (before, extra - before)))


def mapped_shortcut(x: jnp.ndarray, channel_map: Sequence[int], strides: int) -> jnp.ndarray:
    """Option A with explicit channels: output channel j is ``x[..., channel_map[j]]``
    (subsampled by the stride), or zero where ``channel_map[j]`` is -1.

    A compacted network keeps only some channels on each side of the zero-padding
    shortcut, so the symmetric padding becomes this index map.
    """
    x = x[:, ::strides, ::strides, :]
    idx = np.asarray(channel_map, np.int32)
    x = jnp.concatenate([x, jnp.zeros_like(x[..., :1])], axis=-1)  # index C is the zero channel
    return jnp.take(x, np.where(idx < 0, x.shape[-1] - 1, idx), axis=-1)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers and a residual connection; stride on the first conv.

    ``features`` is the output width; ``mid_features`` (default ``features``) the width of
    ``conv1``. ``downsample`` says whether the shortcut pads/projects (default: where the
    stride or the width changes). ``shortcut_map`` replaces option A's symmetric padding
    by an explicit channel map (see ``mapped_shortcut``).
    """
    features: int
    strides: int = 1
    shortcut: str = "A"
    dtype: Any = jnp.float32
    mid_features: Optional[int] = None
    downsample: Optional[bool] = None
    shortcut_map: Optional[Tuple[int, ...]] = None

    @nn.compact
    def __call__(self, x, train: bool):
        if self.shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {self.shortcut!r}")
        mid = self.features if self.mid_features is None else self.mid_features
        y = conv(mid, 3, self.strides, name="conv1", dtype=self.dtype)(x)
        y = nn.relu(batch_norm(train, name="bn1", dtype=self.dtype)(y))
        y = conv(self.features, 3, name="conv2", dtype=self.dtype)(y)
        y = batch_norm(train, name="bn2", dtype=self.dtype)(y)
        downsample = self.downsample
        if downsample is None:
            downsample = self.strides != 1 or x.shape[-1] != self.features
        if downsample:
            if self.shortcut == "A" and self.shortcut_map is not None:
                x = mapped_shortcut(x, self.shortcut_map, self.strides)
            elif self.shortcut == "A":
                x = pad_shortcut(x, self.features, self.strides)
            else:
                x = conv(self.features, 1, self.strides, name="shortcut_conv", dtype=self.dtype)(x)
                x = batch_norm(train, name="shortcut_bn", dtype=self.dtype)(x)
        return nn.relu(y + x)


class ResNetCifar(nn.Module):
    """CIFAR ResNet: ``(N, H, W, C)`` images -> ``(N, num_classes)`` float32 logits.

    ``widths`` are the nominal stage widths (they decide where shortcuts change shape).
    Compacted networks override the actual widths: ``stem_features`` for ``conv1``,
    ``block_widths[i] = (conv1, conv2)`` for block ``i`` in call order, and
    ``shortcut_maps[i]`` (option A) the channel map of block ``i``'s shortcut.
    """
    num_blocks: Sequence[int]
    num_classes: int = 10
    widths: Sequence[int] = (16, 32, 64)
    shortcut: str = "A"
    dtype: Any = jnp.float32
    stem_features: Optional[int] = None
    block_widths: Optional[Tuple[Tuple[int, int], ...]] = None
    shortcut_maps: Optional[Tuple[Optional[Tuple[int, ...]], ...]] = None

    @nn.compact
    def __call__(self, x, train: bool):
        stem = self.widths[0] if self.stem_features is None else self.stem_features
        x = resnet_stem(x, stem, train, self.dtype)
        cin = self.widths[0]
        for name, width, strides, i in resnet_blocks(self.widths, self.num_blocks):
            mid, out = (width, width) if self.block_widths is None else self.block_widths[i]
            x = BasicBlock(out, strides, self.shortcut, self.dtype, mid_features=mid,
                           downsample=strides != 1 or cin != width,
                           shortcut_map=None if self.shortcut_maps is None
                           else self.shortcut_maps[i],
                           name=name)(x, train)
            cin = width
        return classifier_head(x, self.num_classes, self.dtype)


def _resnet_cifar(depth: int, num_classes: int, *, shortcut: str = "A",
                  dtype: Any = jnp.float32) -> ResNetCifar:
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
    n = (depth - 2) // 6
    return ResNetCifar(num_blocks=(n, n, n), num_classes=num_classes,
                       shortcut=shortcut, dtype=dtype)


for _depth in (20, 32, 44, 56, 110):
    register_net(f"res{_depth}s")(functools.partial(_resnet_cifar, _depth))


def _option_a_map(in_keep: np.ndarray, out_keep: np.ndarray, features: int) -> tuple:
    """Compact option-A shortcut: for each kept output channel, the compact index of the
    input channel the standard zero-padding puts there, or -1 for a padded zero."""
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


@register_rebuild(ResNetCifar)
def _rebuild(model: ResNetCifar, shapes: dict, keep: dict) -> ResNetCifar:
    """The narrower network of compacted variables: widths from their kernel shapes and,
    for option A, each block's shortcut channel map from the kept channels."""
    blocks = [(name, width) for name, width, _, _ in resnet_blocks(model.widths, model.num_blocks)]
    maps = None
    if model.shortcut == "A":
        maps = tuple(_option_a_map(keep[f"params/{n}/conv1/kernel"][2],
                                   keep[f"params/{n}/conv2/kernel"][3], w) for n, w in blocks)
    return model.clone(stem_features=kernel_width(shapes, "conv1"),
                       block_widths=tuple((kernel_width(shapes, f"{n}/conv1"),
                                           kernel_width(shapes, f"{n}/conv2")) for n, _ in blocks),
                       shortcut_maps=maps)
