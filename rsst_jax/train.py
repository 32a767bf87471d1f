"""Training: train state, optimizer, the jit-compiled train and eval steps, epoch loops.

The masks, the method's penalty targets and the penalty scale are *arguments* of the
compiled step, so one compiled program serves every round of a run.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rsst_jax import data as data_lib
from rsst_jax import masks as masks_lib
from rsst_jax import trees
from rsst_jax.losses import cross_entropy  # the loss; also train.cross_entropy

Array = jax.Array
PyTree = Any


OPTIMIZERS = ("sgd", "adam", "adamw")
PRECISIONS = ("fp32", "bf16")
FUSED_MODES = ("auto", "on", "off")
NAN_POLICIES = ("stop", "skip")


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


@flax.struct.dataclass
class Hyper:
    """A ticket's schedule values, traced so that tickets trained as one program may
    each have their own: the base learning rate and the values the method's lambda
    schedule reads (``Penalty.values``, e.g. RSST's schedule kind, scale, exponent and
    cap; empty for a method without a schedule)."""
    lr: Array
    penalty: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def make(cls, lr: float, penalty: Optional[dict] = None) -> "Hyper":
        return cls(lr=jnp.float32(lr), penalty=dict(penalty or {}))


@flax.struct.dataclass
class Plan:
    """What the train step applies, one pytree so that one compiled program serves every
    round: ``masks`` (bool per prunable leaf, None elsewhere: the weights kept, and with
    --mask_bn the BatchNorm scale/bias of live channels), the method's penalty ``targets``
    (same structure; all False where the method penalizes nothing this round),
    ``reg_scale`` (float32 multiplier of lambda, e.g. 0.5 while RSST's --reg_adaptive
    halves it), the ticket's ``hyper`` values, and with distillation the ``teacher``
    variables and ``kd_alpha``."""
    masks: PyTree
    targets: PyTree
    reg_scale: Array
    hyper: Hyper
    teacher: PyTree = None
    kd_alpha: Array = 0.0


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static (hashable) settings of the compiled step."""
    flip: bool
    mean: tuple
    std: tuple
    nan_skip: bool = False
    pad: int = 4
    accum_steps: int = 1  # micro-batches per step; the batch size must be a multiple
    distill: bool = False          # the plan carries a teacher and kd_alpha
    kd_temperature: float = 4.0


@dataclasses.dataclass(frozen=True)
class Schedules:
    """A round's step counts and learning-rate schedule (static, shared by tickets
    trained together); the base learning rate it scales is the ticket's ``Hyper.lr``.
    A method's lambda schedule reads the step counts (``Penalty.schedule``).

    lr: linear per-step warm-up over ``warmup_epochs``, then x``gamma`` at each milestone
    epoch.
    """
    steps_per_epoch: int
    total_steps: int
    warmup_epochs: int = 0
    milestones: tuple = ()
    gamma: float = 0.1

    @classmethod
    def of(cls, optim_cfg, steps_per_epoch: int) -> "Schedules":
        """A round's schedules from the ``optim`` configuration group."""
        return cls(steps_per_epoch, steps_per_epoch * optim_cfg.epochs, optim_cfg.warmup,
                   optim_cfg.milestones)

    def lr(self, step, base_lr):
        step = jnp.asarray(step)
        warmup_steps = self.warmup_epochs * self.steps_per_epoch
        boundaries = np.asarray([m * self.steps_per_epoch for m in self.milestones], np.int32)
        decays = jnp.sum(step >= boundaries) if len(boundaries) else 0
        lr = base_lr * self.gamma ** decays
        if warmup_steps > 0:
            lr = jnp.where(step < warmup_steps, base_lr * (step + 1) / warmup_steps, lr)
        return lr


class ScaleByLRState(NamedTuple):
    count: Array  # int32, as optax's ScaleByScheduleState


def scale_by_learning_rate_arg() -> optax.GradientTransformationExtraArgs:
    """``updates * -learning_rate`` with ``learning_rate`` an extra argument of ``update``
    (traced: each ticket brings its own)."""

    def init_fn(params):
        del params
        return ScaleByLRState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, learning_rate, **extra):
        del params, extra
        lr = jnp.asarray(learning_rate)
        updates = jax.tree_util.tree_map(lambda u: (-lr * u).astype(u.dtype), updates)
        return updates, ScaleByLRState(count=optax.safe_int32_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def make_optimizer(*, optimizer: str, momentum: float, weight_decay: float,
                   penalty: Optional[optax.GradientTransformationExtraArgs] = None,
                   masked: bool = True) -> optax.GradientTransformationExtraArgs:
    """penalty -> weight decay -> keep pruned -> optimizer -> keep pruned.

    ``penalty``: what the method adds to the train step (``Penalty.transform``, e.g.
    ``regularizers.rsst_penalty``), or None: nothing (the chain then starts at weight
    decay).

    ``update(grads, state, params, masks=, reg_targets=, reg_lambda=, learning_rate=)``:
    the learning rate and lambda are arguments, so tickets trained as one program may
    each have their own (the train step computes them from the plan's ``Hyper``).
    Weight decay is coupled for sgd/adam (added to the gradient, as PyTorch does) and
    decoupled for adamw. Masking the gradient before the optimizer keeps momentum of
    pruned entries at zero; masking again after makes the zero update exact.
    ``masked=False`` leaves out the penalty and both masks: the plain dense optimizer
    the benchmark compares against.
    """
    parts = [penalty] if masked and penalty is not None else []
    if optimizer in ("sgd", "adam") and weight_decay > 0:
        parts.append(optax.add_decayed_weights(weight_decay))
    if masked:
        parts.append(masks_lib.keep_pruned())
    # Nested as optax.sgd/adam/adamw nest theirs, so the optimizer state keeps its layout.
    if optimizer == "sgd":
        parts.append(optax.chain(optax.trace(decay=momentum) if momentum else optax.identity(),
                                 scale_by_learning_rate_arg()))
    elif optimizer == "adam":
        parts.append(optax.chain(optax.scale_by_adam(), scale_by_learning_rate_arg()))
    elif optimizer == "adamw":
        parts.append(optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay),
                                 scale_by_learning_rate_arg()))
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
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


def default_fused_steps(print_freq: int, platform: Optional[str] = None,
                        num_tickets: int = 1) -> int:
    """Steps per fused chunk when ``--fused_steps`` is not given: ``--print_freq`` on
    accelerators; on CPU ``CPU_FUSED_STEPS`` divided among the ``num_tickets`` tickets
    of the program (at least 1), whose steps are all unrolled into it: its compile time
    grows with the number of steps it holds."""
    if _on_cpu(platform):
        return max(1, CPU_FUSED_STEPS // num_tickets)
    return print_freq


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


def distillation_loss(student_logits, teacher_logits, temperature: float):
    """KL(teacher || student) of the softened distributions, scaled by T^2 (Hinton et al.)."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
    return temperature ** 2 * jnp.mean(jnp.sum(jnp.exp(t) * (t - s), axis=-1))


def make_train_step(model, tx, cfg: StepConfig, schedules: Schedules, *,
                    lambda_schedule=None, batch_sharding=None):
    """Returns ``train_step(state, batch, plan) -> (state, metrics)``, one SGD step.

    ``batch`` is ``(images, labels)``: uint8 NHWC images as the data set holds them (the
    step normalizes with ``cfg.mean``/``cfg.std`` and augments: random crop after
    ``cfg.pad``-pixel padding, flips if ``cfg.flip``) and int labels, host numpy arrays
    from any iterator or device arrays. ``plan`` is a :class:`Plan`. The learning rate
    at this step comes from ``schedules`` and ``plan.hyper.lr``; with a
    ``lambda_schedule`` (the method's ``Penalty.schedule``) lambda is
    ``lambda_schedule(step, plan.hyper.penalty, schedules) * plan.reg_scale``, passed to
    the optimizer as ``reg_lambda``; without one, no lambda is computed.
    ``metrics``: ``loss``, ``correct`` (count), ``finite`` (loss and gradients), the
    ``lr`` applied and, with a lambda schedule, ``reg_lambda``.

    With ``cfg.accum_steps = N > 1`` the augmented batch is split into N micro-batches
    (rows ``m, m+N, ...``) scanned in order: BatchNorm statistics update per micro-batch,
    gradients and loss are averaged, and the optimizer makes one update. For a network
    without BatchNorm that equals the step on the whole batch up to float rounding.
    ``batch_sharding`` (a ``jax.sharding.Sharding`` of a [B] array, see ``parallel``)
    pins the batch axis of the images to the data-parallel mesh.
    ``gather_step(train_step)`` is the same step reading its batch from a device-resident
    data set by index (the fast path of a run).
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

    def train_step(state: TrainState, batch, plan: Plan):
        images, labels = batch
        key = jax.random.fold_in(state.rng, state.step)
        x = data_lib.augment(key, jnp.asarray(images), flip=cfg.flip, pad=cfg.pad)
        y = jnp.asarray(labels)
        if batch_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, batch_sharding)
        grad_fn = loss_and_grads if n_micro == 1 else accumulated
        loss, correct, new_stats, grads = grad_fn(state.params, state.batch_stats, x, y,
                                                  plan.teacher, plan.kd_alpha)
        lr = schedules.lr(state.step, plan.hyper.lr)
        extra = {}
        if lambda_schedule is not None:
            extra["reg_lambda"] = lambda_schedule(state.step, plan.hyper.penalty, schedules) \
                * jnp.asarray(plan.reg_scale, jnp.float32)
        updates, new_opt = tx.update(grads, state.opt_state, state.params, masks=plan.masks,
                                     reg_targets=plan.targets, learning_rate=lr, **extra)
        new_params = optax.apply_updates(state.params, updates)
        # A NaN activation can vanish in a ReLU and leave the loss finite: check the gradients too.
        finite = jnp.isfinite(loss) & all_finite(grads)
        new_state = state.replace(step=state.step + 1, params=new_params,
                                  batch_stats=new_stats, opt_state=new_opt)
        if cfg.nan_skip:
            # Skip the whole update on a non-finite loss; the step counter still moves on.
            new_state = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new_state,
                                               state.replace(step=state.step + 1))
        return new_state, {"loss": loss, "correct": correct, "finite": finite,
                           "lr": jnp.asarray(lr, jnp.float32), **extra}

    return train_step


def gather_step(train_step):
    """``step(state, data_x, data_y, idx, plan)``: ``train_step`` on the batch
    ``(data_x[idx], data_y[idx])`` of a data set held on the device (``idx`` [B] int32),
    so no image crosses the host per step."""
    def step(state, data_x, data_y, idx, plan):
        return train_step(state, (data_x[idx], data_y[idx]), plan)
    return step


def make_epoch_fn(step, unroll=None):
    """One epoch (or a chunk of one): ``step`` (a ``gather_step``) over the rows of
    ``perm`` [k, B].

    ``train_epoch(state, data_x, data_y, perm, plan)`` returns (state, metrics) with
    every metric stacked to [k]. ``unroll`` (default: ``fused_unroll()`` of the default
    backend) is ``lax.scan``'s: True makes straight-line code of the k steps, and for
    k = 1, where ``lax.scan(unroll=True)`` would still be a (one-trip) loop, 40x slower
    on XLA:CPU, the step is called directly.
    """
    unroll = fused_unroll() if unroll is None else unroll

    def train_epoch(state, data_x, data_y, perm, plan):
        if unroll is True and perm.shape[0] == 1:
            state, m = step(state, data_x, data_y, perm[0], plan)
            return state, jax.tree_util.tree_map(lambda x: x[None], m)

        def body(s, idx):
            return step(s, data_x, data_y, idx, plan)
        return jax.lax.scan(body, state, perm, unroll=unroll)

    return train_epoch


def ticket_batching(platform: Optional[str] = None) -> str:
    """How one program trains K tickets: ``vmap`` on accelerators (one batched
    computation fills the chip); ``unroll`` on CPU, where ``vmap`` turns every
    convolution into a grouped one that XLA:CPU runs off its fast path (res20s: 3x fewer
    images/s at K = 4), so the K tickets' steps are written one after another into the
    program instead (docs/performance.md)."""
    return "unroll" if _on_cpu(platform) else "vmap"


def ticket_map(fn, num_tickets: int, in_axes: tuple, batching: Optional[str] = None):
    """``fn`` over a leading ticket axis K of the arguments whose ``in_axes`` entry is 0
    (the others, None, are shared): ``jax.vmap`` for K > 1, or with ``batching='unroll'``
    (CPU, ``ticket_batching``) K calls of ``fn`` written one after another into the one
    program; for K = 1 the axis is dropped and restored around ``fn``, so a single
    ticket runs exactly the program it would run alone."""
    batching = batching or ticket_batching()
    if num_tickets > 1 and batching == "vmap":
        return jax.vmap(fn, in_axes=in_axes)

    def each(*args):
        return trees.stack([fn(*(a if axis is None else trees.ticket(a, k)
                              for a, axis in zip(args, in_axes)))
                         for k in range(num_tickets)])
    return each


def over_tickets(fn, num_tickets: int, batching: Optional[str] = None):
    """``fn(state, data_x, data_y, idx_or_perm, plan)`` with a ticket axis on the state,
    the indices and the plan; the data set is shared (``ticket_map``)."""
    return ticket_map(fn, num_tickets, (0, None, None, 0, 0), batching)


def make_eval_step(model, cfg: StepConfig):
    """``eval_step(variables, x_uint8, y, valid) -> (sum loss, correct)`` over valid rows."""

    def eval_step(variables, x, y, valid):
        x = data_lib.normalize(x, cfg.mean, cfg.std)
        logits = model.apply(variables, x, train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
        correct = (jnp.argmax(logits, -1) == y) & valid
        return jnp.sum(jnp.where(valid, loss, 0.0)), jnp.sum(correct)

    return eval_step


def eval_over_tickets(eval_step, num_tickets: int, batching: Optional[str] = None):
    """``eval_step`` for variables with a leading ticket axis K (the batch is shared):
    returns ([K] loss sums, [K] correct counts) (``ticket_map``)."""
    return ticket_map(eval_step, num_tickets, (0, None, None, None), batching)


def make_bn_recalibration(model, cfg: StepConfig):
    """``recalibrate(variables, data_x, idx) -> batch_stats``: BatchNorm running mean and
    variance re-estimated as the plain mean, over the N batches ``data_x[idx[i]]``
    (``idx`` [N, B]; normalized, not augmented), of the statistics each batch gives in
    train mode; the weights are only read.

    The network's own update, ``new = momentum * old + (1 - momentum) * batch``, computes
    each batch's statistics: started from zeros it gives ``(1 - momentum) * batch``, and
    two passes over one image, from zeros and from ones, give ``momentum`` (so any
    BatchNorm momentum works).
    A network without BatchNorm gets its empty ``batch_stats`` back."""

    def stats_from(variables, x_uint8, start):
        x = data_lib.normalize(x_uint8, cfg.mean, cfg.std)
        _, updates = model.apply({"params": variables["params"], "batch_stats": start}, x,
                                 train=True, mutable=["batch_stats"])
        return updates["batch_stats"]

    def recalibrate(variables, data_x, idx):
        old = variables["batch_stats"]
        zeros = jax.tree_util.tree_map(jnp.zeros_like, old)
        ones = jax.tree_util.tree_map(jnp.ones_like, old)
        first = stats_from(variables, data_x[idx[0]], zeros)
        one = data_x[idx[0, :1]]  # the share is the same for any batch: one image will do
        share = jax.tree_util.tree_map(lambda u, v: 1.0 - (v - u), stats_from(
            variables, one, zeros), stats_from(variables, one, ones))

        def body(total, rows):
            return jax.tree_util.tree_map(jnp.add, total,
                                          stats_from(variables, data_x[rows], zeros)), None

        total, _ = jax.lax.scan(body, first, idx[1:])
        n = idx.shape[0]
        return jax.tree_util.tree_map(lambda t, c, o: (t / (n * c)).astype(o.dtype),
                                      total, share, old)

    return recalibrate


def bn_batch_count(n_train: int, batch_size: int, n: Optional[int], images: int) -> int:
    """How many batches ``--bn_recalibrate n`` re-estimates over: ``n``, or, for None
    (the default), the fewest batches of ``batch_size`` that hold ``images`` training
    images, at most the training set's whole batches."""
    if n is not None:
        return n
    return min(-(-images // batch_size), steps_per_epoch(n_train, batch_size))


def bn_batch_indices(n_train: int, batch_size: int, n: int) -> np.ndarray:
    """[n, B] training indices of ``--bn_recalibrate n``: the first n batches of one
    fixed permutation (the same for every ticket, round and epoch); ValueError when the
    training set has fewer batches."""
    perm = np.asarray(epoch_permutation(jax.random.PRNGKey(0), n_train, batch_size))
    if not 1 <= n <= len(perm):
        raise ValueError(f"--bn_recalibrate {n}: the training set has {len(perm)} batches "
                         f"of --batch_size; choose 1 to {len(perm)}")
    return perm[:n].astype(np.int32)


def recalibrated(model, variables: dict, ds, n: int, batch_size: int) -> dict:
    """``variables`` of one network with BatchNorm statistics re-estimated over
    ``bn_batch_indices`` of data set ``ds`` (``make_bn_recalibration``), for a ticket
    outside a run (``experiments.compact --bn_recalibrate``)."""
    cfg = StepConfig(flip=ds.flip, mean=tuple(ds.mean), std=tuple(ds.std))
    idx = bn_batch_indices(ds.train_x.shape[0], batch_size, n)
    stats = jax.jit(make_bn_recalibration(model, cfg))(variables, jnp.asarray(ds.train_x),
                                                       jnp.asarray(idx))
    return dict(variables, batch_stats=stats)


def evaluate(eval_step, variables, x: Array, y: Array, batch_size: int):
    """Accuracy (%) and mean loss over all of (x, y); the last batch is padded, not
    recompiled. With an ``eval_over_tickets`` step, a list of one such dict per ticket."""
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
        total_loss = total_loss + np.asarray(loss, np.float64)
        total_correct = total_correct + np.asarray(correct, np.int64)
    if np.ndim(total_correct) == 0:
        return {"acc": 100.0 * int(total_correct) / n, "loss": float(total_loss) / n}
    return [{"acc": 100.0 * int(c) / n, "loss": float(lo) / n}
            for lo, c in zip(total_loss, total_correct)]


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


__all__ = ["OPTIMIZERS", "PRECISIONS", "FUSED_MODES", "NAN_POLICIES", "TrainState", "Hyper",
           "Plan", "StepConfig", "Schedules", "scale_by_learning_rate_arg",
           "make_optimizer", "compute_dtype", "use_fused", "fused_unroll",
           "default_fused_steps", "create_train_state", "reset_optimizer", "make_train_step",
           "gather_step", "make_epoch_fn", "ticket_batching", "ticket_map", "over_tickets", "make_eval_step", "eval_over_tickets",
           "make_bn_recalibration", "bn_batch_indices", "recalibrated", "evaluate",
           "steps_per_epoch", "epoch_permutation", "cross_entropy", "all_finite",
           "tree_is_finite"]
