"""MobileNet v1 for CIFAR (kuangliu/pytorch-cifar): 3x3 stem of 32 channels at stride 1,
13 depthwise-separable blocks, global average pool, linear ``fc``."""
from typing import Any, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp

from rsst_jax.nets.registry import kernel_width, register_net, register_rebuild
from rsst_jax.nets.layers import batch_norm, classifier_head, conv

# Output channels of each block; (channels, stride) where the block downsamples.
CFG = (64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024)


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv (kernel ``(3, 3, 1, C)``) + BN + ReLU, then 1x1 conv + BN + ReLU."""
    features: int
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        channels = x.shape[-1]
        x = conv(channels, 3, self.strides, groups=channels, name="conv_dw", dtype=self.dtype)(x)
        x = nn.relu(batch_norm(train, name="bn_dw", dtype=self.dtype)(x))
        x = conv(self.features, 1, name="conv_pw", dtype=self.dtype)(x)
        return nn.relu(batch_norm(train, name="bn_pw", dtype=self.dtype)(x))


class MobileNet(nn.Module):
    """``(N, H, W, C)`` images -> ``(N, num_classes)`` float32 logits."""
    cfg: Sequence[Union[int, Tuple[int, int]]] = CFG
    num_classes: int = 10
    stem_features: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = conv(self.stem_features, 3, name="conv1", dtype=self.dtype)(x)
        x = nn.relu(batch_norm(train, name="bn1", dtype=self.dtype)(x))
        for i, item in enumerate(self.cfg):
            features, strides = item if isinstance(item, tuple) else (item, 1)
            x = DepthwiseSeparable(features, strides, self.dtype, name=f"block{i}")(x, train)
        return classifier_head(x, self.num_classes, self.dtype, name="fc")


@register_net("mobilenet")
def mobilenet(num_classes: int, *, dtype: Any = jnp.float32) -> MobileNet:
    return MobileNet(num_classes=num_classes, dtype=dtype)


@register_rebuild(MobileNet)
def _rebuild(model: MobileNet, shapes: dict, keep: dict) -> MobileNet:
    """The narrower network of compacted variables: widths from their kernel shapes."""
    cfg = []
    for i, item in enumerate(model.cfg):
        w = kernel_width(shapes, f"block{i}/conv_pw")
        cfg.append((w, item[1]) if isinstance(item, tuple) else w)
    return model.clone(stem_features=kernel_width(shapes, "conv1"), cfg=tuple(cfg))
