"""RSST penalty: the lambda schedules and the optax transformation that applies them.

A schedule is a pure function of the optimizer step ``t`` (0-based, the number of
updates already applied in the round), returning a float32 scalar, usable like an
optax schedule and safe to call with a traced step inside ``jax.jit``.

Notation (docs/SPEC.md section 2): ``g = granularity``, ``T = total_steps`` (optimizer steps
in the round), progress ``p = (t+1)/T`` in (0, 1], and ``u = floor((t+1)/interval)``
the number of regularization updates so far (one per ``update_interval`` steps).

| name                   | lambda(t)                                  |
|------------------------|--------------------------------------------|
| ``x``                  | ``g*u``                                    |
| ``x^2``                | ``(g*u)**2``                               |
| ``x^3``                | ``(g*u)**3``                               |
| ``exp``                | ``exp(g*u)``                               |
| ``exp_custom``         | ``g/(e-1) * (exp(p) - 1)``                 |
| ``exp_custom_exponents``| ``g/(e-1) * (exp(p**exponents) - 1)``     |

Every schedule is capped at ``upper_limit`` when it is set. ``exp_custom*`` reach
exactly ``g`` at the last step of the round (``t = T-1``).

The penalty ``lambda * w`` with SGD is stable only while
``lr * lambda < 2 * (1 + momentum)``; :func:`first_unstable_step` finds the first step
of a round that crosses that line, so the CLI can warn before training.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

SCHEDULES = ("x", "x^2", "x^3", "exp", "exp_custom", "exp_custom_exponents")
PROGRESS = ("round", "epoch")

# Schedules driven by the update count u; the others by the progress p.
_COUNT_SCHEDULES = ("x", "x^2", "x^3", "exp")


@dataclasses.dataclass(frozen=True)
class LambdaSchedule:
    """lambda(t) for one round; call it with the step (int, array or traced int).

    Built by :func:`lambda_schedule`, which validates the fields. Frozen and hashable,
    so it can be closed over or passed as a static argument of a jitted function.
    Steps outside ``[0, T-1]`` are clipped: past the round lambda holds its last value.
    """

    name: str
    total_steps: int
    granularity: float
    exponents: float
    update_interval: int
    upper_limit: Optional[float]
    progress: str
    steps_per_epoch: Optional[int]

    def __call__(self, step) -> jnp.ndarray:
        """Return lambda at ``step`` as float32 with the shape of ``step``."""
        return lambda_at(step, kind=self.name, granularity=self.granularity,
                         exponents=self.exponents, upper_limit=self.upper_limit,
                         total_steps=self.total_steps, update_interval=self.update_interval,
                         progress=self.progress, steps_per_epoch=self.steps_per_epoch)


def lambda_at(step, *, kind, granularity, exponents, upper_limit, total_steps: int,
              update_interval: int, progress: str = "round",
              steps_per_epoch: Optional[int] = None) -> jnp.ndarray:
    """lambda at ``step`` (int or traced) as float32 with the shape of ``step``.

    ``kind`` is a name of :data:`SCHEDULES`, or its index there as a (traced) int, so
    that tickets trained as one program may each follow another schedule.
    ``granularity``, ``exponents`` and ``upper_limit`` may be traced (``upper_limit``
    None or inf: no cap); the step counts are static.
    """
    t = jnp.clip(jnp.asarray(step, jnp.int32), 0, total_steps - 1)
    g = jnp.asarray(granularity, jnp.float32)
    named = isinstance(kind, str)

    def by_count(name):
        gu = g * ((t + 1) // update_interval).astype(jnp.float32)
        return {"x": lambda: gu, "x^2": lambda: gu * gu, "x^3": lambda: gu * gu * gu,
                "exp": lambda: jnp.exp(gu)}[name]()

    def by_progress(name):
        # 'epoch' is the reference's ramp: progress restarts every epoch.
        period = steps_per_epoch if progress == "epoch" else total_steps
        done = (t % period) + 1  # steps of the ramp done, 1 .. period
        p = done.astype(jnp.float32) / jnp.float32(period)
        q = p if name == "exp_custom" else p ** jnp.asarray(exponents, jnp.float32)
        ramp = g * (jnp.expm1(q) / jnp.float32(math.e - 1.0))
        # Exactly g at the end of the ramp: XLA may divide by multiplying with the
        # reciprocal, so p itself can land one ulp below 1.
        return jnp.where(done == period, g, ramp)

    def value(name):
        return by_count(name) if name in _COUNT_SCHEDULES else by_progress(name)

    if named:
        lam = value(kind)
    else:
        index = jnp.asarray(kind, jnp.int32)
        lam = jnp.select([index == i for i in range(len(SCHEDULES))],
                         [value(name) for name in SCHEDULES], jnp.float32(jnp.nan))
    if upper_limit is not None:
        lam = jnp.minimum(lam, jnp.asarray(upper_limit, jnp.float32))
    return lam.astype(jnp.float32)


def lambda_schedule(
    name: str,
    *,
    total_steps: int,
    granularity: float = 1.0,
    exponents: float = 4.0,
    update_interval: Optional[int] = None,
    upper_limit: Optional[float] = None,
    progress: str = "round",
    steps_per_epoch: Optional[int] = None,
) -> LambdaSchedule:
    """Build the lambda schedule ``name`` (one of :data:`SCHEDULES`) for a round.

    Args:
      name: schedule name, see the module docstring.
      total_steps: ``T``, optimizer steps in the round (>= 1).
      granularity: ``g``, the schedule's scale (``--reg_granularity_prune``).
      exponents: exponent of ``p`` for ``exp_custom_exponents``.
      update_interval: steps per regularization update for the ``u``-driven schedules
        (``x``, ``x^2``, ``x^3``, ``exp``); defaults to ``steps_per_epoch`` when given,
        else to ``total_steps``.
      upper_limit: cap on lambda (``--reg_upper_limit``); ``None`` means no cap.
      progress: ``'round'`` (default): ``p = (t+1)/T`` runs once over the round, so
        ``exp_custom*`` reach ``g`` once, at the last step. ``'epoch'``: the
        reference's per-epoch ramp, offered deliberately: ``p`` is recomputed within
        each epoch from the batch index, ``p = ((t mod steps_per_epoch)+1) /
        steps_per_epoch``, so ``exp_custom*`` climb to ``g`` in every epoch and fall
        back at the next. Only the ``p``-driven schedules depend on it.
      steps_per_epoch: optimizer steps per epoch; required for ``progress='epoch'``.

    Returns:
      A callable ``schedule(step) -> float32`` (a :class:`LambdaSchedule`).

    Raises:
      ValueError: on an unknown name or progress, or a non-positive step count.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown lambda schedule {name!r}; choices: {', '.join(SCHEDULES)}")
    if progress not in PROGRESS:
        raise ValueError(f"unknown progress {progress!r}; choices: {', '.join(PROGRESS)}")
    if int(total_steps) < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if steps_per_epoch is not None and int(steps_per_epoch) < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if progress == "epoch" and steps_per_epoch is None:
        raise ValueError("progress='epoch' needs steps_per_epoch")
    if update_interval is None:
        update_interval = steps_per_epoch if steps_per_epoch is not None else total_steps
    if int(update_interval) < 1:
        raise ValueError(f"update_interval must be >= 1, got {update_interval}")
    if not float(exponents) > 0:
        raise ValueError(f"exponents must be > 0, got {exponents}")
    return LambdaSchedule(
        name=name,
        total_steps=int(total_steps),
        granularity=float(granularity),
        exponents=float(exponents),
        update_interval=int(update_interval),
        upper_limit=None if upper_limit is None else float(upper_limit),
        progress=progress,
        steps_per_epoch=None if steps_per_epoch is None else int(steps_per_epoch),
    )


def _schedule_values(schedule: Callable, total_steps: int) -> np.ndarray:
    """``schedule`` at steps ``0 .. total_steps-1`` as a float64 host array ``[T]``
    (``schedule`` may already be those values)."""
    if not callable(schedule):
        return np.asarray(schedule, np.float64)[: int(total_steps)]
    steps = jnp.arange(int(total_steps), dtype=jnp.int32)
    values = jax.vmap(lambda s: jnp.asarray(schedule(s), jnp.float32))(steps)
    return np.asarray(values, np.float64)


def max_lambda(schedule: Callable, total_steps: int) -> float:
    """Largest lambda the schedule takes over steps ``0 .. total_steps-1`` (host side)."""
    if int(total_steps) < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return float(np.max(_schedule_values(schedule, total_steps)))


def stability_limit(lr: float, momentum: float = 0.0) -> float:
    """Largest stable lambda for SGD with heavy-ball momentum: ``2*(1+momentum)/lr``.

    The penalty ``lambda*w`` alone is a quadratic of curvature ``lambda``; SGD on it
    diverges once ``lr*lambda >= 2*(1+momentum)``. Returns ``inf`` for ``lr <= 0``.
    """
    if lr <= 0:
        return math.inf
    return 2.0 * (1.0 + momentum) / lr


def first_unstable_step(
    schedule: Callable,
    lrs_or_lr_fn: Union[float, np.ndarray, Callable],
    momentum: float,
    total_steps: int,
) -> Optional[int]:
    """First step ``t < total_steps`` where ``lr(t)*lambda(t) >= 2*(1+momentum)``.

    Args:
      schedule: a lambda schedule, or its values at every step.
      lrs_or_lr_fn: the learning rate: a constant, an array with one value per step
        (at least ``total_steps`` long), or an optax-style schedule ``lr(step)``.
      momentum: SGD momentum (0 for plain SGD).
      total_steps: steps in the round.

    Returns:
      The step as an int, or ``None`` when the round stays stable. Host side.
    """
    lam = _schedule_values(schedule, total_steps)
    if callable(lrs_or_lr_fn):
        lr = _schedule_values(lrs_or_lr_fn, total_steps)
    else:
        lr = np.asarray(lrs_or_lr_fn, np.float64)
        if lr.ndim == 0:
            lr = np.full(int(total_steps), float(lr))
        elif lr.shape[0] < int(total_steps):
            raise ValueError(f"need {total_steps} learning rates, got {lr.shape[0]}")
        lr = lr[: int(total_steps)]
    with np.errstate(invalid="ignore"):  # 0 * inf for lr = 0 at an overflowed lambda
        unstable = np.nan_to_num(lr * lam, nan=0.0) >= 2.0 * (1.0 + momentum)
    hits = np.flatnonzero(unstable)
    return int(hits[0]) if hits.size else None


def remaining_norm_fraction(lrs, lambdas, momentum: float = 0.0,
                            weight_decay: float = 0.0) -> float:
    """How much of its norm the penalty alone leaves to a targeted weight after a round.

    SGD with heavy-ball momentum on the penalty ``(lambda_t + weight_decay) * w`` only
    (the loss gradient left out, as with ``--block_loss_grad``), from the round's fresh
    optimizer state: ``v <- momentum * v + (lambda_t + wd) * w; w <- w - lr_t * v``.
    The recurrence is linear and the same for every targeted weight, so every one of
    them, and their L2 norm, ends at ``|w_T / w_0|`` of where it started: the value this
    returns (host side, float64). ``lrs`` and ``lambdas`` hold one value per step of the
    round. The loss gradient can only keep a weight the network needs larger, so a
    round's measured fraction is at least about this (equal with ``--block_loss_grad``).
    Returns ``inf`` when the recurrence diverges.
    """
    lrs = np.asarray(lrs, np.float64)
    lambdas = np.asarray(lambdas, np.float64) + float(weight_decay)
    w, v = 1.0, 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for lr, lam in zip(lrs.tolist(), lambdas.tolist()):
            v = momentum * v + lam * w
            w = w - lr * v
            if not math.isfinite(w) or abs(w) > 1e30:
                return math.inf
    return abs(w)


class RSSTState(NamedTuple):
    """State of :func:`rsst_penalty`: ``count`` = updates applied this round (int32 [])."""

    count: jnp.ndarray


def rsst_penalty(*, block_loss_grad: bool = False) -> optax.GradientTransformationExtraArgs:
    """Add ``lambda * w`` to the gradient of every targeted weight.

    The reference's ``apply_reg`` (``grad += reg * w``); with ``block_loss_grad`` the
    loss gradient of targeted weights is dropped and only the penalty acts. Chain it
    before the optimizer so the penalty passes through momentum like a gradient:
    ``optax.chain(rsst_penalty(), keep_pruned(), optax.sgd(lr, momentum))``.

    ``update(updates, state, params, *, reg_targets=None, reg_lambda=None, **extra)``:
      reg_targets: pytree with the structure of ``params``: a bool array of the leaf's
        shape (True = penalize) for prunable leaves, ``None`` elsewhere. ``None`` as a
        whole means no penalty (the step count still advances). A traced argument: one
        compiled step serves every target content.
      reg_lambda: lambda (traced float32), needed with ``reg_targets``: the train step
        computes it from the ticket's own schedule (e.g. ``lambda_schedule(...)(step)``)
        times its scale (:func:`adaptive_scale`) and logs the value it applied.
    """

    def init_fn(params):
        del params
        return RSSTState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, reg_targets=None, reg_lambda=None,
                  **extra):
        del extra
        new_state = RSSTState(count=optax.safe_int32_increment(state.count))
        if reg_targets is None:
            return updates, new_state
        if params is None:
            raise ValueError("rsst_penalty needs params when reg_targets is given")
        if reg_lambda is None:
            raise ValueError("rsst_penalty needs the reg_lambda argument with reg_targets")
        lam = jnp.asarray(reg_lambda, jnp.float32)

        def penalize(target, grad, weight):
            if target is None:
                return grad
            if target.shape != grad.shape or target.dtype != jnp.bool_:
                raise ValueError(
                    f"reg target must be bool{grad.shape}, got {target.dtype}{target.shape}")
            base = jnp.zeros_like(grad) if block_loss_grad else grad
            return jnp.where(target, base + (lam * weight).astype(grad.dtype), grad)

        # Map over the targets first: their None leaves are empty subtrees for JAX.
        new_updates = jax.tree_util.tree_map(
            penalize, reg_targets, updates, params, is_leaf=lambda x: x is None)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------- the budget

# A round's penalized weights should end below this fraction of their norm. Measured
# (docs/comparison.md, README): at 2% applying S cost at most one test image; at 6% it
# cost 2 to 22 points in a narrow network, at 12 to 28% 27 to 69 points.
PENALTY_BUDGET = 0.03
# What a suggested fix aims the prediction at. The loss gradient holds a penalized
# weight near (its loss gradient) / lambda, so the measured fraction stays above the
# prediction: 2-3% where the prediction was 0.06%, 5.5-8% where 1.5%, 12-17% where
# 6.8% (res8s_narrow on digits, docs/comparison.md). Under 0.1% it ends under 3%.
SUGGESTION_TARGET = 0.001


def schedule_values(schedules, schedule, values: dict, lr) -> tuple:
    """(lambda, lr) at every step of a round, host float64 arrays: ``schedule(step,
    values, schedules)`` (RSST's ``lambda_schedule``) and the learning rate from base
    ``lr``."""
    steps = jnp.arange(schedules.total_steps, dtype=jnp.int32)
    base = jnp.float32(lr)
    lam = jax.vmap(lambda t: schedule(t, values, schedules))(steps)
    lrs = jax.vmap(lambda t: schedules.lr(t, base))(steps)
    return np.asarray(lam, np.float64), np.asarray(lrs, np.float64)


def predicted_norm_fraction(schedules, schedule, values: dict, optim_cfg) -> float:
    """The fraction of their norm the RSST penalty alone leaves to the penalized
    weights by the end of a round (``remaining_norm_fraction``)."""
    lam, lr = schedule_values(schedules, schedule, values, optim_cfg.lr)
    return remaining_norm_fraction(lr, lam, optim_cfg.momentum, optim_cfg.weight_decay)


def suggest_granularity(schedules, schedule, values: dict, optim_cfg,
                        target: float) -> Optional[float]:
    """The smallest ``--reg_granularity_prune`` (``values["g"]``, to 2 significant
    digits) whose round leaves at most ``target`` of the norm and stays stable; None if
    none does."""
    def frac(g):
        lam, lr = schedule_values(schedules, schedule, dict(values, g=jnp.float32(g)),
                                  optim_cfg.lr)
        if first_unstable_step(lam, lr, optim_cfg.momentum, len(lr)) is not None:
            return None
        return remaining_norm_fraction(lr, lam, optim_cfg.momentum, optim_cfg.weight_decay)
    g = float(values["g"]) or 1e-3
    for _ in range(40):  # double until it reaches the target (or turns unstable)
        f = frac(g)
        if f is None:
            return None
        if f <= target:
            break
        g *= 2
    else:
        return None
    lo, hi = g / 2, g
    for _ in range(20):
        mid = (lo + hi) / 2
        f = frac(mid)
        if f is not None and f <= target:
            hi = mid
        else:
            lo = mid
    for digits in (2, 3, 4):  # the shortest rounding up that still reaches the target
        rounded = float(np.format_float_positional(hi, precision=digits, unique=False,
                                                   fractional=False, trim="-"))
        rounded = max(rounded, float(f"{hi:.{digits}g}"))
        f = frac(rounded)
        if f is not None and f <= target:
            return rounded
    return hi


def penalty_report(schedules, schedule, values: dict, cfg,
                   computed=None) -> tuple[float, Optional[str]]:
    """(predicted fraction, a warning line or None) for an RSST configuration on SGD;
    ``computed``: ``schedule_values(...)`` when already computed."""
    lam, lr = computed if computed is not None else schedule_values(
        schedules, schedule, values, cfg.optim.lr)
    frac = remaining_norm_fraction(lr, lam, cfg.optim.momentum, cfg.optim.weight_decay)
    if frac <= PENALTY_BUDGET:
        return frac, None
    g = suggest_granularity(schedules, schedule, values, cfg.optim, SUGGESTION_TARGET)
    fix = (f"pass --reg_granularity_prune {g:g} (the penalty alone then leaves "
           f"{100 * predicted_norm_fraction(schedules, schedule, dict(values, g=jnp.float32(g)), cfg.optim):.2f}%)"
           if g is not None else "raise --reg_granularity_prune")
    return frac, (f"warning: the RSST penalty alone leaves the penalized weights "
                  f"{100 * frac:.1f}% of their norm by the end of each round (above "
                  f"{100 * PENALTY_BUDGET:.0f}%), so applying the channel mask will cost "
                  f"accuracy; {fix}, or decay the learning rate later in the round "
                  f"(--decreasing_lr {cfg.optim.decreasing_lr} now)")


def penalty_check(cfg, schedules, schedule, values: dict) -> tuple[float, list[str]]:
    """What a run of SGD (and its --dry_run) says of its RSST penalty before training:
    the stability of SGD under it and what it leaves of the penalized weights' norm by
    each round's end. (predicted fraction, lines)."""
    lam, lr = schedule_values(schedules, schedule, values, cfg.optim.lr)
    lines = []
    step = first_unstable_step(lam, lr, cfg.optim.momentum, schedules.total_steps)
    if step is not None:
        lines.append(f"warning: lr * lambda crosses 2 * (1 + momentum) at step {step} of "
                     f"{schedules.total_steps} in each RSST round; SGD will diverge there. "
                     f"Set --reg_upper_limit or a smaller --reg_granularity_prune")
    frac, warning = penalty_report(schedules, schedule, values, cfg, (lam, lr))
    lines.append(f"RSST penalty: by the end of each round the penalty alone leaves the "
                 f"penalized weights {100 * frac:.2f}% of their norm (at most "
                 f"{100 * PENALTY_BUDGET:.0f}% wanted; a round's line shows the measured "
                 f"fraction)")
    return frac, lines + ([warning] if warning else [])


def target_stats(params, targets) -> tuple[float, float, int]:
    """(L2 norm of the targeted weights, fraction of them below 1e-3, count); host side."""
    sq, small, count = 0.0, 0, 0
    for w, t in zip(jax.tree_util.tree_leaves(params),
                    jax.tree_util.tree_leaves(targets, is_leaf=lambda x: x is None)):
        if t is None:
            continue
        w, t = np.asarray(w), np.asarray(t)
        sq += float(np.sum((w * t) ** 2))
        small += int(np.sum((np.abs(w) < 1e-3) & t))
        count += int(t.sum())
    return float(np.sqrt(sq)), (small / count if count else 0.0), count


def adaptive_scale(last_val_acc: Optional[float], target_acc: float) -> float:
    """``--reg_adaptive``: 0.5 while the last validation accuracy is below ``target_acc``.

    Host side; the train step multiplies lambda by it (the plan's ``reg_scale``). Before any validation
    (``last_val_acc is None``) there is nothing below the target, so the scale is 1.
    Accuracies must share units (both fractions or both percentages).
    """
    if last_val_acc is None:
        return 1.0
    return 0.5 if float(last_val_acc) < float(target_acc) else 1.0


# --------------------------------------------------------------------------- group lasso

def group_lasso(strength: float) -> optax.GradientTransformationExtraArgs:
    """The gradient of ``strength * sum_g ||w_g||_2`` added to the gradient: for every
    entry of group g, ``strength * w / ||w_g||`` (0 where ``||w_g|| = 0``, the
    subgradient at the origin).

    ``update(updates, state, params, *, reg_targets, **extra)``: ``reg_targets`` has the
    structure of ``params`` with an int32 array per prunable leaf (None elsewhere): each
    entry's group id, -1 for none; ids lie in ``[0, n)`` with n the sum of the last-axis
    sizes of those arrays (one id per output channel is the usual grouping: Wen et al.,
    NeurIPS 2016). A group may span leaves (a channel's kernel slice with its BatchNorm
    scale and bias, channels coupled through a residual addition)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, reg_targets=None, **extra):
        del extra
        if reg_targets is None:
            return updates, state
        ids, treedef = jax.tree_util.tree_flatten(reg_targets, is_leaf=lambda x: x is None)
        ws = treedef.flatten_up_to(params)
        gs = treedef.flatten_up_to(updates)
        n = sum(int(t.shape[-1]) if t.ndim else 1 for t in ids if t is not None)
        sq = jnp.zeros((n + 1,), jnp.float32)
        for t, w in zip(ids, ws):
            if t is not None:
                seg = jnp.where(t >= 0, t, n).reshape(-1)
                sq = sq + jax.ops.segment_sum(jnp.square(w.astype(jnp.float32)).reshape(-1),
                                              seg, num_segments=n + 1)
        norm = jnp.sqrt(sq)

        def add(t, g, w):
            if t is None:
                return g
            nw = norm[jnp.where(t >= 0, t, n)]
            pen = jnp.where((t >= 0) & (nw > 0), strength * w / jnp.where(nw > 0, nw, 1.0), 0.0)
            return g + pen.astype(g.dtype)

        return treedef.unflatten([add(t, g, w) for t, g, w in zip(ids, gs, ws)]), state

    return optax.GradientTransformationExtraArgs(init, update)


def group_norms(params, group_ids) -> np.ndarray:
    """Host side: ``||w_g||_2`` of every group id of ``group_ids`` (``group_lasso``'s
    layout), a float64 array indexed by id."""
    ids, sq = [], []
    for t, w in zip(jax.tree_util.tree_leaves(group_ids, is_leaf=lambda x: x is None),
                    jax.tree_util.tree_leaves(params)):
        if t is not None:
            t, w = np.asarray(t).reshape(-1), np.asarray(w, np.float64).reshape(-1)
            ids.append(t[t >= 0])
            sq.append(w[t >= 0] ** 2)
    ids = np.concatenate(ids) if ids else np.zeros(0, int)
    return np.sqrt(np.bincount(ids, np.concatenate(sq) if sq else None))
