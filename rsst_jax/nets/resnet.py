"""ResNet-18/50 with the CIFAR stem (3x3 conv, stride 1, no max-pool), as kuangliu/pytorch-cifar.

Four stages of widths 64/128/256/512 (times 4 at the output of a bottleneck);
projection shortcuts (1x1 conv + BN) wherever the shape changes. The optional per-layer
widths (``stem_features``, ``block_widths``) describe a compacted network
(``rsst_jax.compact``; ``_rebuild`` at the bottom sets them); left at None they give the
standard one.
"""
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from rsst_jax.nets.registry import kernel_width, register_net, register_rebuild
from rsst_jax.nets.layers import batch_norm, classifier_head, conv, resnet_blocks, resnet_stem
from rsst_jax.nets.resnet_cifar import BasicBlock


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand to ``4 * features``, each + BN.

    Compacted networks override the widths: ``widths = (conv1, conv2, conv3)``, and
    ``downsample`` (default: where the stride or the width changes) says whether the
    shortcut projects.
    """
    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    widths: Optional[Tuple[int, int, int]] = None
    downsample: Optional[bool] = None
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        w1, w2, out_features = (self.features, self.features, self.expansion * self.features) \
            if self.widths is None else self.widths
        y = conv(w1, 1, name="conv1", dtype=self.dtype)(x)
        y = nn.relu(batch_norm(train, name="bn1", dtype=self.dtype)(y))
        y = conv(w2, 3, self.strides, name="conv2", dtype=self.dtype)(y)
        y = nn.relu(batch_norm(train, name="bn2", dtype=self.dtype)(y))
        y = conv(out_features, 1, name="conv3", dtype=self.dtype)(y)
        y = batch_norm(train, name="bn3", dtype=self.dtype)(y)
        downsample = self.downsample
        if downsample is None:
            downsample = self.strides != 1 or x.shape[-1] != out_features
        if downsample:
            x = conv(out_features, 1, self.strides, name="shortcut_conv", dtype=self.dtype)(x)
            x = batch_norm(train, name="shortcut_bn", dtype=self.dtype)(x)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """``(N, H, W, C)`` images -> ``(N, num_classes)`` float32 logits.

    ``widths`` are the nominal stage widths. Compacted networks override the actual
    widths: ``stem_features`` for ``conv1`` and ``block_widths[i]`` for the convs of block
    ``i`` in call order (``(conv1, conv2)``, or ``(conv1, conv2, conv3)`` for bottlenecks).
    """
    num_blocks: Sequence[int]
    bottleneck: bool = False
    num_classes: int = 10
    widths: Sequence[int] = (64, 128, 256, 512)
    dtype: Any = jnp.float32
    stem_features: Optional[int] = None
    block_widths: Optional[Tuple[Tuple[int, ...], ...]] = None

    @nn.compact
    def __call__(self, x, train: bool):
        stem = self.widths[0] if self.stem_features is None else self.stem_features
        x = resnet_stem(x, stem, train, self.dtype)
        cin = self.widths[0]
        for name, width, strides, i in resnet_blocks(self.widths, self.num_blocks):
            widths = None if self.block_widths is None else tuple(self.block_widths[i])
            if self.bottleneck:
                cout = Bottleneck.expansion * width
                block = Bottleneck(width, strides, self.dtype, widths=widths,
                                   downsample=strides != 1 or cin != cout, name=name)
            else:
                cout = width
                mid, out = (width, width) if widths is None else widths
                block = BasicBlock(out, strides, "B", self.dtype, mid_features=mid,
                                   downsample=strides != 1 or cin != cout, name=name)
            x = block(x, train)
            cin = cout
        return classifier_head(x, self.num_classes, self.dtype)


@register_net("res18")
def res18(num_classes: int, *, dtype: Any = jnp.float32) -> ResNet:
    return ResNet(num_blocks=(2, 2, 2, 2), bottleneck=False, num_classes=num_classes, dtype=dtype)


@register_net("res50")
def res50(num_classes: int, *, dtype: Any = jnp.float32) -> ResNet:
    return ResNet(num_blocks=(3, 4, 6, 3), bottleneck=True, num_classes=num_classes, dtype=dtype)


@register_rebuild(ResNet)
def _rebuild(model: ResNet, shapes: dict, keep: dict) -> ResNet:
    """The narrower network of compacted variables: widths from their kernel shapes."""
    convs = ("conv1", "conv2", "conv3") if model.bottleneck else ("conv1", "conv2")
    blocks = [name for name, *_ in resnet_blocks(model.widths, model.num_blocks)]
    return model.clone(stem_features=kernel_width(shapes, "conv1"),
                       block_widths=tuple(tuple(kernel_width(shapes, f"{n}/{c}") for c in convs)
                                          for n in blocks))
