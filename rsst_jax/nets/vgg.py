"""VGG with batch norm for CIFAR: configurations A/B/D/E, global average pool, one linear layer.

Conv ``i`` (counting convs only, from 0) is ``features_conv{i}`` followed by ``features_bn{i}``.
Max-pools pad like PyTorch's ``ceil_mode=True``, so 28x28 inputs reach 1x1 (28-14-7-4-2-1).
"""
import functools
from typing import Any, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from rsst_jax.nets.registry import kernel_width, register_net, register_rebuild
from rsst_jax.nets.layers import batch_norm, classifier_head, conv

# Simonyan & Zisserman (2015) table 1; "M" is a 2x2 max-pool with stride 2.
CFGS = {
    "vgg11_bn": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13_bn": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16_bn": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                 512, 512, 512, "M"),
    "vgg19_bn": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                 512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """``(N, H, W, C)`` images -> ``(N, num_classes)`` float32 logits."""
    cfg: Sequence[Union[int, str]]
    num_classes: int = 10
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        i = 0
        for item in self.cfg:
            if item == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
            else:
                x = conv(item, 3, name=f"features_conv{i}", dtype=self.dtype)(x)
                x = nn.relu(batch_norm(train, name=f"features_bn{i}", dtype=self.dtype)(x))
                i += 1
        return classifier_head(x, self.num_classes, self.dtype, name="classifier")


def _vgg(name: str, num_classes: int, *, dtype: Any = jnp.float32) -> VGG:
    return VGG(cfg=CFGS[name], num_classes=num_classes, dtype=dtype)


for _name in CFGS:
    register_net(_name)(functools.partial(_vgg, _name))


@register_rebuild(VGG)
def _rebuild(model: VGG, shapes: dict, keep: dict) -> VGG:
    """The narrower network of compacted variables: widths from their kernel shapes."""
    widths = iter(kernel_width(shapes, f"features_conv{i}") for i in range(len(model.cfg)))
    return model.clone(cfg=tuple("M" if item == "M" else next(widths) for item in model.cfg))
