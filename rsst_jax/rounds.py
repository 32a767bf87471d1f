"""The iterative procedure's rounds as pure functions, whatever the method (docs/SPEC.md
section 2).

What every method shares: the network's prunable kernels and their BatchNorm extension,
a round's plan (:class:`RoundPlan`, built by :func:`plan_round` from the masks and the
penalty targets a method chose), the channel scores a method may rank with, rewinding,
a round's fresh optimizer and its batch order, the channel masks S applied at a round's
end, and the records of a round. What differs between IMP, Refill, RSST and your own
method (how the next round's masks are chosen, what the train step adds, what it
records) is the method's (``rsst_jax.methods``). Everything here is a function of values: no files, no printing,
no globals. The driver (``rsst_jax.driver``) calls these and does the side effects;
``docs/api.md`` uses them in a custom loop.

These functions take one ticket; tickets trained as one program are planned one by one
with ``trees.for_each`` (each may prune with its own rate and criterion) and stacked for
the step, which runs over the ticket axis (``train.over_tickets``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from rsst_jax import criteria as criteria_lib
from rsst_jax import data as data_lib
from rsst_jax import masks as masks_lib
from rsst_jax import model_masks
from rsst_jax import train as train_lib
from rsst_jax import trees

PyTree = Any
PRUNE_TYPES = ("lt", "pt", "rewind_lt")

# Derived keys of the random streams, as fold_in(PRNGKey(seed), stream).
KEY_INIT, KEY_ROUND, KEY_EPOCH, KEY_RANDOM_PRUNE, KEY_CRITERIA = 0, 1, 2, 7, 11


@dataclasses.dataclass(frozen=True, eq=False)
class Network:
    """A model with what pruning needs to know of it: one image's shape, the stem
    kernel's path (the first conv the input meets) and which BatchNorm follows which
    conv (found by tracing, never by names)."""
    model: Any
    image_shape: tuple

    @functools.cached_property  # writes the instance __dict__: fine on a frozen dataclass
    def stem(self) -> Optional[str]:
        return model_masks.stem_kernel(self.model, self.image_shape)

    def bn_masks(self, params_like, masks):
        return model_masks.bn_masks(self.model, params_like, masks, self.image_shape)


@flax.struct.dataclass
class RoundPlan:
    """A round of one ticket: kernel masks ``masks`` (M), ``channel_masks`` (S, applied at
    the round's end where ``applies_s``; else the same as ``masks``), and ``step``, the
    :class:`train.Plan` the compiled step applies (its ``targets``: what the method's
    penalty acts on). ``applies_s`` is static."""
    masks: PyTree
    channel_masks: PyTree
    step: train_lib.Plan
    applies_s: bool = flax.struct.field(pytree_node=False, default=False)


# --------------------------------------------------------------------------- masks

def initial_masks(net: Network, params, prune_cfg) -> PyTree:
    """All-True masks of the prunable kernels (every conv but the stem; ``--conv1`` adds
    it, ``--prune_fc`` the dense kernels)."""
    return masks_lib.init_masks(params, conv1=prune_cfg.conv1, fc=prune_cfg.prune_dense,
                                stem=net.stem)


def train_masks(net: Network, params_like, masks, prune_cfg) -> PyTree:
    """Kernel masks plus, with --mask_bn, masks of the BatchNorm scale/bias that follow
    each conv (False for channels whose kernel slice is all pruned)."""
    if not prune_cfg.use_mask_bn:
        return masks
    return model_masks.merge_masks(masks, net.bn_masks(params_like, masks))


def no_targets(masks) -> PyTree:
    return jax.tree_util.tree_map(lambda m: None if m is None else jnp.zeros_like(m), masks,
                                  is_leaf=trees.is_none)


def plan_round(net: Network, params_like, prune_cfg, masks, channel_masks=None, *,
               targets: Optional[Callable[[PyTree, Optional[PyTree]], Optional[PyTree]]] = None,
               hyper: train_lib.Hyper, reg_scale: float = 1.0, teacher=None,
               kd_alpha: float = 0.0) -> RoundPlan:
    """The plan of a round trained with kernel masks M = ``masks`` (``train_masks``: with
    --mask_bn also the BatchNorm of dead channels), ending by applying ``channel_masks``
    S where given, its penalty acting on ``targets(alive, alive_s)`` (``Method.targets``:
    the training masks of M and of S, None without S; a tree shaped like ``alive``, or
    None, as without ``targets``: nothing penalized)."""
    alive = train_masks(net, params_like, masks, prune_cfg)
    alive_s = None if channel_masks is None else train_masks(net, params_like, channel_masks,
                                                             prune_cfg)
    chosen = None if targets is None else targets(alive, alive_s)
    step = train_lib.Plan(masks=alive, targets=no_targets(alive) if chosen is None else chosen,
                          reg_scale=jnp.float32(reg_scale), hyper=hyper, teacher=teacher,
                          kd_alpha=jnp.float32(kd_alpha))
    return RoundPlan(masks=masks, channel_masks=masks if channel_masks is None else channel_masks,
                     step=step, applies_s=channel_masks is not None)


# --------------------------------------------------------------------------- channel scores

def criteria_batches(key, train_x, train_y, batch_size: int, round_idx: int, count: int
                     ) -> tuple[list, Any]:
    """The training batches (raw uint8 images, labels) a round's channel scores see, and
    the key the criterion gets (``hessian``'s probes)."""
    k = jax.random.fold_in(jax.random.fold_in(key, KEY_CRITERIA), round_idx)
    perm = train_lib.epoch_permutation(k, train_x.shape[0], batch_size)
    return [(train_x[perm[b]], train_y[perm[b]])
            for b in range(min(count, perm.shape[0]))], k


def score_channels(net: Network, variables, masks_before, masks_after, prune_cfg, batches,
                   *, key, mean, std) -> PyTree:
    """Per-output-channel scores (``--criteria``) of the trained ticket.

    As the reference: the kernels are the trained weights as they were before this
    round's magnitude prune (``masks_before``); only ``remain`` counts the new mask
    ``masks_after``. ``--score_after_prune`` scores the pruned kernels instead.
    ``batches``: (uint8 images, labels) pairs, normalized here with ``mean``/``std``.
    """
    normalized = [(data_lib.normalize(x, mean, std), y) for x, y in batches]
    kernel_masks = masks_after if prune_cfg.score_after_prune else masks_before
    return criteria_lib.channel_scores(
        prune_cfg.criteria, net.model.apply, variables, masks_after, normalized, key=key,
        num_batches=len(normalized), hessian_samples=prune_cfg.hessian_samples,
        kernel_masks=kernel_masks)


# --------------------------------------------------------------------------- a round

def rewind_to(point: dict, plan: RoundPlan) -> dict:
    """``point`` (params and batch_stats) with the plan's masks applied: a new round's
    weights (lt: W0, rewind_lt: the saved epoch, pt: the pretrained weights)."""
    return {"params": masks_lib.apply_masks(point["params"], plan.step.masks),
            "batch_stats": point["batch_stats"]}


def start_round(state: train_lib.TrainState, tx, key, round_idx: int) -> train_lib.TrainState:
    """Fresh optimizer state, step counter (the schedules restart) and augmentation
    stream for round ``round_idx``."""
    state = train_lib.reset_optimizer(state, tx)
    return state.replace(rng=jax.random.fold_in(jax.random.fold_in(key, KEY_ROUND), round_idx))


def epoch_key(key, round_idx: int, epoch: int):
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, KEY_EPOCH),
                                                 round_idx), epoch)


def epoch_indices(key, n: int, batch_size: int, round_idx: int, epoch: int) -> np.ndarray:
    """[steps, B] sample indices of epoch ``epoch`` (from 0) of round ``round_idx``, in a
    run's order (drop_last)."""
    return np.asarray(train_lib.epoch_permutation(epoch_key(key, round_idx, epoch), n,
                                                  batch_size))


def epoch_batches(ds, key, round_idx: int, epoch: int, batch_size: int):
    """The (uint8 images, labels) host batches of an epoch, as a run orders them."""
    for idx in epoch_indices(key, ds.train_x.shape[0], batch_size, round_idx, epoch):
        yield ds.train_x[idx], ds.train_y[idx]


def apply_channel_masks(net: Network, params_like, prune_cfg, state, plan: RoundPlan
                        ) -> tuple[train_lib.TrainState, RoundPlan]:
    """End of a round that ``applies_s``: M := S, the weights S removes set to zero."""
    after = plan_round(net, params_like, prune_cfg, plan.channel_masks, hyper=plan.step.hyper,
                       teacher=plan.step.teacher, kd_alpha=float(plan.step.kd_alpha))
    return state.replace(params=masks_lib.apply_masks(state.params, after.step.masks)), after


# --------------------------------------------------------------------------- records

def summary_row(round_idx: int, epochs: int, best: dict, last: dict) -> dict:
    """A round's summary row as far as training tells it: the best validation epoch
    (from 1), the test accuracy there, the final accuracies."""
    return {"round": round_idx, "best_val_acc": best["val_acc"],
            "best_val_epoch": best["epoch"], "test_acc_at_best_val": best["test_acc"],
            "epochs": epochs, "final_val_acc": last["val_acc"],
            "final_test_acc": last["test_acc"]}


__all__ = ["PRUNE_TYPES", "Network", "RoundPlan", "initial_masks", "train_masks", "no_targets",
           "plan_round", "criteria_batches", "score_channels", "rewind_to", "start_round",
           "epoch_key", "epoch_indices", "epoch_batches", "apply_channel_masks",
           "summary_row"]
