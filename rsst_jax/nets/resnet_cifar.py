"""He et al. (2016) CIFAR ResNets: 6n+2 layers, three stages of widths 16/32/64.

``shortcut='A'`` (default, as in the paper and akamaster/pytorch_resnet_cifar10) is
parameter-free: subsample by the stride and zero-pad the new channels.
``shortcut='B'`` projects with a 1x1 conv + BN wherever the shape changes.
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from rsst_jax.nets import register_net
from rsst_jax.nets.layers import batch_norm, conv, dense, global_avg_pool

SHORTCUTS = ("A", "B")


def pad_shortcut(x: jnp.ndarray, features: int, strides: int) -> jnp.ndarray:
    """Option A: ``x[:, ::s, ::s, :]``, the new zero channels split evenly before and after."""
    x = x[:, ::strides, ::strides, :]
    extra = features - x.shape[-1]
    before = extra // 2
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (before, extra - before)))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers and a residual connection; stride on the first conv."""
    features: int
    strides: int = 1
    shortcut: str = "A"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        if self.shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {self.shortcut!r}")
        y = conv(self.features, 3, self.strides, name="conv1", dtype=self.dtype)(x)
        y = nn.relu(batch_norm(train, name="bn1", dtype=self.dtype)(y))
        y = conv(self.features, 3, name="conv2", dtype=self.dtype)(y)
        y = batch_norm(train, name="bn2", dtype=self.dtype)(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            if self.shortcut == "A":
                x = pad_shortcut(x, self.features, self.strides)
            else:
                x = conv(self.features, 1, self.strides, name="shortcut_conv", dtype=self.dtype)(x)
                x = batch_norm(train, name="shortcut_bn", dtype=self.dtype)(x)
        return nn.relu(y + x)


class ResNetCifar(nn.Module):
    """CIFAR ResNet: ``(N, H, W, C)`` images -> ``(N, num_classes)`` float32 logits."""
    num_blocks: Sequence[int]
    num_classes: int = 10
    widths: Sequence[int] = (16, 32, 64)
    shortcut: str = "A"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = conv(self.widths[0], 3, name="conv1", dtype=self.dtype)(x)
        x = nn.relu(batch_norm(train, name="bn1", dtype=self.dtype)(x))
        for s, (width, n) in enumerate(zip(self.widths, self.num_blocks), start=1):
            for b in range(n):
                strides = 2 if s > 1 and b == 0 else 1
                x = BasicBlock(width, strides, self.shortcut, self.dtype,
                               name=f"layer{s}_{b}")(x, train)
        x = dense(self.num_classes, name="fc", dtype=self.dtype)(global_avg_pool(x))
        return x.astype(jnp.float32)


def _resnet_cifar(depth: int, num_classes: int, *, shortcut: str = "A",
                  dtype: Any = jnp.float32) -> ResNetCifar:
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
    n = (depth - 2) // 6
    return ResNetCifar(num_blocks=(n, n, n), num_classes=num_classes,
                       shortcut=shortcut, dtype=dtype)


for _depth in (20, 32, 44, 56, 110):
    register_net(f"res{_depth}s")(functools.partial(_resnet_cifar, _depth))
