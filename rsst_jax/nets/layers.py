"""Building blocks shared by the networks: PyTorch-equivalent conv, batch norm and head.

Every conv and dense kernel uses the same Kaiming-normal initializer, BatchNorm uses
PyTorch's defaults (momentum 0.1 in PyTorch's convention, i.e. 0.9 here), and convs
pad like PyTorch's ``padding=k//2`` (symmetric), so weights port between the two.
"""
from typing import Any, Iterator, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

# torch.nn.init.kaiming_normal_(mode='fan_in', nonlinearity='relu'): N(0, 2 / fan_in), untruncated.
KAIMING_NORMAL = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def conv(features: int, kernel_size: int, strides: int = 1, *, name: str,
         dtype: Any = jnp.float32, groups: int = 1) -> nn.Conv:
    """Bias-free ``kernel_size`` x ``kernel_size`` conv padded ``kernel_size // 2`` on every side.

    Kernel shape ``(k, k, in // groups, features)``. Symmetric padding (not 'SAME', which
    pads only after the input for even sizes at stride 2) matches PyTorch's output.
    """
    pad = kernel_size // 2
    return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                   padding=((pad, pad), (pad, pad)), use_bias=False,
                   feature_group_count=groups, kernel_init=KAIMING_NORMAL,
                   dtype=dtype, name=name)


def batch_norm(train: bool, *, name: str, dtype: Any = jnp.float32) -> nn.BatchNorm:
    """PyTorch-default BatchNorm: batch statistics when training, running ones otherwise."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=dtype, name=name)


def dense(features: int, *, name: str, dtype: Any = jnp.float32) -> nn.Dense:
    """Linear layer with Kaiming-normal kernel ``(in, features)`` and zero bias."""
    return nn.Dense(features, kernel_init=KAIMING_NORMAL,
                    bias_init=nn.initializers.zeros, dtype=dtype, name=name)


def global_avg_pool(x: jnp.ndarray) -> jnp.ndarray:
    """``(N, H, W, C)`` -> ``(N, C)`` mean over the spatial axes."""
    return jnp.mean(x, axis=(1, 2))


def resnet_stem(x: jnp.ndarray, features: int, train: bool, dtype: Any) -> jnp.ndarray:
    """``conv1`` (3x3) -> ``bn1`` -> ReLU; call inside a module's compact ``__call__``."""
    x = conv(features, 3, name="conv1", dtype=dtype)(x)
    return nn.relu(batch_norm(train, name="bn1", dtype=dtype)(x))


def resnet_blocks(widths: Sequence[int],
                  num_blocks: Sequence[int]) -> Iterator[Tuple[str, int, int, int]]:
    """``(name, width, strides, index)`` of every residual block, stage by stage: block
    ``layer{stage}_{b}``, stride 2 at the first block of every stage after the first."""
    i = 0
    for s, (width, n) in enumerate(zip(widths, num_blocks), start=1):
        for b in range(n):
            yield f"layer{s}_{b}", width, 2 if s > 1 and b == 0 else 1, i
            i += 1


def classifier_head(x: jnp.ndarray, num_classes: int, dtype: Any,
                    name: str = "fc") -> jnp.ndarray:
    """Global average pool -> dense ``name``; float32 logits whatever the compute dtype."""
    return dense(num_classes, name=name, dtype=dtype)(global_avg_pool(x)).astype(jnp.float32)
