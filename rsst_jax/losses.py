"""The training loss, shared by the training step (``rsst_jax.train``) and the criteria
that differentiate it (``rsst_jax.criteria``: saliency, hessian), so that the pruning
core never imports the training module."""
from __future__ import annotations

import jax.numpy as jnp
import optax


def cross_entropy(logits, labels):
    """Mean cross-entropy over the batch (in float32); ``logits`` ``[N, classes]``,
    ``labels`` integer ``[N]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


__all__ = ["cross_entropy"]
