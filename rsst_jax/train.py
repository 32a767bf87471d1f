"""Training: train state, optimizer, the jit-compiled train and eval steps, epoch loops.

The masks, the RSST penalty targets and the penalty scale are *arguments* of the
compiled step, so one compiled program serves every round of a run.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rsst_jax import data as data_lib
from rsst_jax import masks as masks_lib
from rsst_jax import regularizers

Array = jax.Array
PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a value, never aliased."""
    step: Array          # int32 scalar, optimizer steps taken this round
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    rng: Array           # uint32[2] raw key: augmentation keys are fold_in(rng, step)

    @property
    def variables(self):
        return {"params": self.params, "batch_stats": self.batch_stats}


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static (hashable) settings of the compiled step."""
    flip: bool
    mean: tuple
    std: tuple
    nan_skip: bool = False
    pad: int = 4
    accum_steps: int = 1  # micro-batches per step; the batch size must be a multiple
    distill: bool = False          # the step takes (teacher_variables, kd_alpha) as well
    kd_temperature: float = 4.0


def lr_schedule(base_lr: float, steps_per_epoch: int, warmup_epochs: int,
                milestones: tuple[int, ...], gamma: float = 0.1) -> optax.Schedule:
    """Linear per-step warm-up over ``warmup_epochs``, then x``gamma`` at each milestone epoch."""
    warmup_steps = warmup_epochs * steps_per_epoch
    boundaries = np.asarray([m * steps_per_epoch for m in milestones], np.int32)

    def schedule(step):
        step = jnp.asarray(step)
        decays = jnp.sum(step >= boundaries) if len(boundaries) else 0
        lr = base_lr * gamma ** decays
        if warmup_steps > 0:
            lr = jnp.where(step < warmup_steps, base_lr * (step + 1) / warmup_steps, lr)
        return lr
    return schedule


def make_optimizer(*, optimizer: str, lr: optax.Schedule, momentum: float, weight_decay: float,
                   reg_schedule: Optional[Callable] = None,
                   block_loss_grad: bool = False,
                   masked: bool = True) -> optax.GradientTransformationExtraArgs:
    """penalty -> weight decay -> keep pruned -> optimizer -> keep pruned.

    Weight decay is coupled for sgd/adam (added to the gradient, as PyTorch does) and
    decoupled for adamw. Masking the gradient before the optimizer keeps momentum of
    pruned entries at zero; masking again after makes the zero update exact.
    ``masked=False`` leaves out the penalty and both masks: the plain dense optimizer
    the benchmark compares against.
    """
    reg_schedule = reg_schedule or (lambda step: jnp.zeros((), jnp.float32))
    parts = [regularizers.rsst_penalty(reg_schedule, block_loss_grad=block_loss_grad)] if masked else []
    if optimizer in ("sgd", "adam") and weight_decay > 0:
        parts.append(optax.add_decayed_weights(weight_decay))
    if masked:
        parts.append(masks_lib.keep_pruned())
    if optimizer == "sgd":
        parts.append(optax.sgd(lr, momentum=momentum or None))
    elif optimizer == "adam":
        parts.append(optax.adam(lr))
    elif optimizer == "adamw":
        parts.append(optax.adamw(lr, weight_decay=weight_decay))
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    if masked:
        parts.append(masks_lib.keep_pruned())
    return optax.chain(*parts)


def compute_dtype(precision: str):
    """``--precision`` -> the networks' compute dtype (parameters always stay float32)."""
    return {"fp32": jnp.float32, "bf16": jnp.bfloat16}[precision]


# Steps per fused chunk on CPU when --fused_steps is not given (see fused_unroll).
CPU_FUSED_STEPS = 8


def use_fused(setting: str) -> bool:
    """``--fused``: on/off; auto is on everywhere (the chunk's form and default length
    depend on the platform: ``fused_unroll``, ``default_fused_steps``)."""
    if setting in ("on", "off"):
        return setting == "on"
    if setting != "auto":
        raise ValueError(f"--fused must be auto, on or off, got {setting!r}")
    return True


def _on_cpu(platform: Optional[str]) -> bool:
    return (platform or jax.default_backend()) == "cpu"


def fused_unroll(platform: Optional[str] = None):
    """``lax.scan``'s ``unroll`` for a fused chunk: 1 (a loop) on accelerators, True
    (the chunk's steps unrolled into straight-line code) on CPU.

    XLA:CPU (jax 0.10) leaves the weight-gradient convolutions inside a loop body in a
    form its fast convolution library does not take, and a rolled chunk runs tens of
    times slower than the same steps one by one; unrolled, the chunk is one program
    10 to 20% faster than the step loop (res20s, batch 128), for a compile time that
    grows with the chunk length (docs/performance.md).
    """
    return True if _on_cpu(platform) else 1


def default_fused_steps(print_freq: int, platform: Optional[str] = None) -> int:
    """Steps per fused chunk when ``--fused_steps`` is not given: ``--print_freq`` on
    accelerators, ``CPU_FUSED_STEPS`` on CPU (an unrolled chunk compiles in proportion
    to its length)."""
    return CPU_FUSED_STEPS if _on_cpu(platform) else print_freq


def create_train_state(model, tx, key: Array, sample_shape: tuple) -> TrainState:
    """Initialize variables from ``key`` (a raw uint32[2] key) and the optimizer state."""
    init_key, rng = jax.random.split(key)
    variables = model.init({"params": init_key}, jnp.zeros((1, *sample_shape), jnp.float32),
                           train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=rng)


def reset_optimizer(state: TrainState, tx) -> TrainState:
    """New round: fresh optimizer state and step counter (the LR schedule restarts)."""
    return state.replace(step=jnp.zeros((), jnp.int32), opt_state=tx.init(state.params))


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def distillation_loss(student_logits, teacher_logits, temperature: float):
    """KL(teacher || student) of the softened distributions, scaled by T^2 (Hinton et al.)."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
    return temperature ** 2 * jnp.mean(jnp.sum(jnp.exp(t) * (t - s), axis=-1))


def make_train_step(model, tx, cfg: StepConfig, *, batch_sharding=None):
    """Returns ``train_step(state, data_x, data_y, idx, masks, targets, reg_scale)``.

    ``data_x`` (uint8, NHWC) and ``data_y`` are the whole training split on the device;
    ``idx`` [B] picks the batch, so no data crosses the host per step.
    With ``cfg.distill`` it also takes the teacher's variables and ``kd_alpha`` (traced,
    so round 0 passes 0 and the same program serves every round).
    Returns (new_state, metrics) with metrics = dict(loss, correct, finite).

    With ``cfg.accum_steps = N > 1`` the augmented batch is split into N micro-batches
    (rows ``m, m+N, ...``) scanned in order: BatchNorm statistics update per micro-batch,
    gradients and loss are averaged, and the optimizer makes one update. For a network
    without BatchNorm that equals the step on the whole batch up to float rounding.
    ``batch_sharding`` (a ``jax.sharding.Sharding`` of a [B] array, see ``parallel``)
    pins the batch axis of the gathered images to the data-parallel mesh.
    """
    n_micro = int(cfg.accum_steps)

    def loss_and_grads(params, batch_stats, x_uint8, y, teacher, kd_alpha):
        """(loss, correct count, new batch_stats, grads) of one (micro-)batch."""
        x = data_lib.normalize(x_uint8, cfg.mean, cfg.std)
        if cfg.distill:
            teacher_logits = jax.lax.stop_gradient(model.apply(teacher, x, train=False))

        def loss_fn(p):
            logits, updates = model.apply({"params": p, "batch_stats": batch_stats},
                                          x, train=True, mutable=["batch_stats"])
            loss = cross_entropy(logits, y)
            if cfg.distill:
                kd = distillation_loss(logits, teacher_logits, cfg.kd_temperature)
                loss = (1.0 - kd_alpha) * loss + kd_alpha * kd
            return loss, (logits, updates["batch_stats"])

        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, jnp.sum(jnp.argmax(logits, -1) == y), new_stats, grads

    def accumulated(params, batch_stats, x_uint8, y, teacher, kd_alpha):
        b = x_uint8.shape[0] // n_micro
        # Micro-batch m takes rows m, m+N, ...: on a mesh each one spans every device.
        split = lambda a: jnp.swapaxes(a.reshape(b, n_micro, *a.shape[1:]), 0, 1)  # noqa: E731

        def body(carry, xy):
            stats, gsum, lsum, csum = carry
            loss, correct, stats, grads = loss_and_grads(params, stats, *xy, teacher, kd_alpha)
            gsum = jax.tree_util.tree_map(jnp.add, gsum, grads)
            return (stats, gsum, lsum + loss, csum + correct), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        init = (batch_stats, zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        (stats, gsum, lsum, csum), _ = jax.lax.scan(body, init, (split(x_uint8), split(y)))
        grads = jax.tree_util.tree_map(lambda g: g / n_micro, gsum)
        return lsum / n_micro, csum, stats, grads

    def train_step(state: TrainState, data_x, data_y, idx, masks, targets, reg_scale,
                   teacher=None, kd_alpha=0.0):
        key = jax.random.fold_in(state.rng, state.step)
        x = data_lib.augment(key, data_x[idx], flip=cfg.flip, pad=cfg.pad)
        y = data_y[idx]
        if batch_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, batch_sharding)
        grad_fn = loss_and_grads if n_micro == 1 else accumulated
        loss, correct, new_stats, grads = grad_fn(state.params, state.batch_stats, x, y,
                                                  teacher, kd_alpha)
        updates, new_opt = tx.update(grads, state.opt_state, state.params, masks=masks,
                                     reg_targets=targets, reg_scale=reg_scale)
        new_params = optax.apply_updates(state.params, updates)
        # A NaN activation can vanish in a ReLU and leave the loss finite: check the gradients too.
        finite = jnp.isfinite(loss) & all_finite(grads)
        new_state = state.replace(step=state.step + 1, params=new_params,
                                  batch_stats=new_stats, opt_state=new_opt)
        if cfg.nan_skip:
            # Skip the whole update on a non-finite loss; the step counter still moves on.
            new_state = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new_state,
                                               state.replace(step=state.step + 1))
        return new_state, {"loss": loss, "correct": correct, "finite": finite}

    return train_step


def make_epoch_fn(train_step, unroll=None):
    """One epoch (or a chunk of one): the steps over the rows of ``perm`` [k, B].

    ``train_epoch(state, data_x, data_y, perm, masks, targets, reg_scale, *extras)``
    returns (state, metrics) with every metric stacked to [k]; ``extras`` are the step's
    (teacher, kd_alpha) with distillation. ``unroll`` (default: ``fused_unroll()`` of the
    default backend): True traces the k steps one after another into straight-line code
    (a Python loop, so no ``while`` for any k: ``lax.scan(unroll=True)`` of length 1 is a
    rolled one-trip loop, 40x slower on XLA:CPU); an int is ``lax.scan``'s ``unroll``.
    """
    unroll = fused_unroll() if unroll is None else unroll

    def train_epoch(state, data_x, data_y, perm, masks, targets, reg_scale, *extras):
        if unroll is True:
            metrics = []
            for i in range(perm.shape[0]):
                state, m = train_step(state, data_x, data_y, perm[i], masks, targets,
                                      reg_scale, *extras)
                metrics.append(m)
            return state, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *metrics)

        def body(s, idx):
            return train_step(s, data_x, data_y, idx, masks, targets, reg_scale, *extras)
        return jax.lax.scan(body, state, perm, unroll=unroll)

    return train_epoch


def make_multi_seed_step(train_step):
    """``train_step`` (or a ``make_epoch_fn`` chunk) vmapped over K independent tickets:
    state, idx [K, B] (perm [K, k, B]), masks, targets and reg_scale [K] carry a leading
    seed axis; the data set is shared."""
    return jax.vmap(train_step, in_axes=(0, None, None, 0, 0, 0, 0))


def make_eval_step(model, cfg: StepConfig):
    """``eval_step(variables, x_uint8, y, valid) -> (sum loss, correct)`` over valid rows."""

    def eval_step(variables, x, y, valid):
        x = data_lib.normalize(x, cfg.mean, cfg.std)
        logits = model.apply(variables, x, train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
        correct = (jnp.argmax(logits, -1) == y) & valid
        return jnp.sum(jnp.where(valid, loss, 0.0)), jnp.sum(correct)

    return eval_step


def evaluate(eval_step, variables, x: Array, y: Array, batch_size: int) -> dict:
    """Accuracy (%) and mean loss over all of (x, y); the last batch is padded, not recompiled."""
    n = int(x.shape[0])
    bs = min(batch_size, n)
    total_loss, total_correct = 0.0, 0
    for start in range(0, n, bs):
        stop = min(start + bs, n)
        xb, yb = x[start:stop], y[start:stop]
        valid = jnp.arange(bs) < (stop - start)
        if stop - start < bs:
            pad = bs - (stop - start)
            xb = jnp.concatenate([xb, jnp.zeros((pad, *xb.shape[1:]), xb.dtype)])
            yb = jnp.concatenate([yb, jnp.zeros((pad,), yb.dtype)])
        loss, correct = eval_step(variables, xb, yb, valid)
        total_loss += float(loss)
        total_correct += int(correct)
    return {"acc": 100.0 * total_correct / n, "loss": total_loss / n}


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return max(1, n_train // batch_size) if n_train >= batch_size else 1


def epoch_permutation(key: Array, n: int, batch_size: int) -> Array:
    """[num_batches, B] indices of one epoch (drop_last; a set smaller than B repeats)."""
    nb = steps_per_epoch(n, batch_size)
    if n >= batch_size:
        return jax.random.permutation(key, n)[: nb * batch_size].reshape(nb, batch_size)
    return jax.random.choice(key, n, (1, batch_size), replace=True)


def all_finite(tree) -> Array:
    """Whether every floating-point entry of ``tree`` is finite (a traceable bool array)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def tree_is_finite(tree) -> bool:
    return bool(all_finite(tree))


__all__ = ["TrainState", "StepConfig", "lr_schedule", "make_optimizer", "compute_dtype",
           "use_fused", "fused_unroll", "default_fused_steps", "create_train_state",
           "reset_optimizer", "make_train_step", "make_epoch_fn", "make_multi_seed_step",
           "make_eval_step", "evaluate", "steps_per_epoch", "epoch_permutation",
           "cross_entropy", "all_finite", "tree_is_finite"]
