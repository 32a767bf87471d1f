"""ResNet-18/50 with the CIFAR stem (3x3 conv, stride 1, no max-pool), as kuangliu/pytorch-cifar.

Four stages of widths 64/128/256/512 (times 4 at the output of a bottleneck);
projection shortcuts (1x1 conv + BN) wherever the shape changes.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from rsst_jax.nets import register_net
from rsst_jax.nets.layers import batch_norm, conv, dense, global_avg_pool
from rsst_jax.nets.resnet_cifar import BasicBlock


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand to ``4 * features``, each + BN."""
    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        out_features = self.expansion * self.features
        y = conv(self.features, 1, name="conv1", dtype=self.dtype)(x)
        y = nn.relu(batch_norm(train, name="bn1", dtype=self.dtype)(y))
        y = conv(self.features, 3, self.strides, name="conv2", dtype=self.dtype)(y)
        y = nn.relu(batch_norm(train, name="bn2", dtype=self.dtype)(y))
        y = conv(out_features, 1, name="conv3", dtype=self.dtype)(y)
        y = batch_norm(train, name="bn3", dtype=self.dtype)(y)
        if self.strides != 1 or x.shape[-1] != out_features:
            x = conv(out_features, 1, self.strides, name="shortcut_conv", dtype=self.dtype)(x)
            x = batch_norm(train, name="shortcut_bn", dtype=self.dtype)(x)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """``(N, H, W, C)`` images -> ``(N, num_classes)`` float32 logits."""
    num_blocks: Sequence[int]
    bottleneck: bool = False
    num_classes: int = 10
    widths: Sequence[int] = (64, 128, 256, 512)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = conv(self.widths[0], 3, name="conv1", dtype=self.dtype)(x)
        x = nn.relu(batch_norm(train, name="bn1", dtype=self.dtype)(x))
        for s, (width, n) in enumerate(zip(self.widths, self.num_blocks), start=1):
            for b in range(n):
                strides = 2 if s > 1 and b == 0 else 1
                name = f"layer{s}_{b}"
                if self.bottleneck:
                    block = Bottleneck(width, strides, self.dtype, name=name)
                else:
                    block = BasicBlock(width, strides, "B", self.dtype, name=name)
                x = block(x, train)
        x = dense(self.num_classes, name="fc", dtype=self.dtype)(global_avg_pool(x))
        return x.astype(jnp.float32)


@register_net("res18")
def res18(num_classes: int, *, dtype: Any = jnp.float32) -> ResNet:
    return ResNet(num_blocks=(2, 2, 2, 2), bottleneck=False, num_classes=num_classes, dtype=dtype)


@register_net("res50")
def res50(num_classes: int, *, dtype: Any = jnp.float32) -> ResNet:
    return ResNet(num_blocks=(3, 4, 6, 3), bottleneck=True, num_classes=num_classes, dtype=dtype)
