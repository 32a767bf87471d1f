"""How the driver's tickets start, resume and move to the next round.

``start(run)`` gives every ticket its state, plan and rewind point: from its newest
usable resume checkpoint (``--resume``), else from W0 (``--init`` or ``init/``, made
from the seed and saved there; ``--prune_type pt`` merges the pretrained weights in).
``plan_next_round(run, r)`` prunes each trained ticket, plans its next round and
rewinds it. Both leave the stacked values in ``run.states``, ``run.plan`` and
``run.rewind``.
"""
from __future__ import annotations

import json
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from rsst_jax import checkpoint as ckpt
from rsst_jax import config as config_lib
from rsst_jax import masks as masks_lib
from rsst_jax import pretrained as pretrained_lib
from rsst_jax import parallel, regularizers, rounds
from rsst_jax.paths import atomic_write
from rsst_jax.engine import hyper_of


class RunError(RuntimeError):
    """A run directory or input that cannot be used; the message says what to do."""


def print_flushed(message: str) -> None:
    print(message, flush=True)  # flushed: runs are often followed through a log file


def copy(tree):
    """An independent copy: the train step donates its input buffers."""
    return jax.tree_util.tree_map(jnp.copy, tree)


def snapshot(state) -> dict:
    return copy({"params": state.params, "batch_stats": state.batch_stats})


def replace_ticket(stacked, k: int, tree):
    """``stacked`` with ticket k replaced by ``tree``."""
    return jax.tree_util.tree_map(lambda s, x: s.at[k].set(x), stacked, tree)


def resume_source(cfg) -> Optional[pathlib.Path]:
    """The checkpoint directory a run of ``cfg`` resumes from, or None when it starts
    afresh; raises RunError where the run must not go on (a --save_dir holding a run
    without --resume, nothing to resume from, or checkpoints made with other flags).
    ``--resume`` on a run killed before its first checkpoint starts afresh (None).
    The configuration is compared with the newest checkpoint whose metadata reads (an
    unreadable one is set aside when the run restores, see ``_resume``)."""
    from rsst_jax import paths as paths_lib
    r = cfg.run
    ckpt_dir = paths_lib.RunPaths.of(r.save_dir).checkpoints
    if not r.resume:
        if ckpt.latest_step(ckpt_dir) is not None:
            raise RunError(f"--save_dir {r.save_dir} already holds a run; pass --resume to "
                           f"continue it, or choose another --save_dir")
        return None
    if r.checkpoint is None and ckpt.latest_step(ckpt_dir) is None:
        return None
    source = pathlib.Path(r.checkpoint) if r.checkpoint else ckpt_dir
    if ckpt.latest_step(source) is None:
        raise RunError(f"--resume: no checkpoint in {source}; start without --resume, or "
                       f"point --save_dir/--checkpoint at an existing run")
    for step in reversed(ckpt.steps(source)):
        try:
            saved = ckpt.read_meta(source, step).get("config", {})
        except ckpt.CheckpointError:
            continue
        listed = config_lib.semantic_diffs(saved, cfg.to_dict())
        if listed:
            raise RunError(f"--resume: {source} was made with a different configuration: "
                           f"{listed}; resume with the same flags, or start a new --save_dir")
        break
    return source


def _finite_state(tree, meta) -> Optional[str]:
    """``restore_newest_good``'s check: a resume checkpoint holds finite weights (a run
    stops before it writes NaN/Inf, so any there is damage)."""
    from rsst_jax import train as train_lib
    for name in ("state", "rewind"):
        if not train_lib.tree_is_finite(tree[name]):
            return f"non-finite values in its {name}"
    return None


# --------------------------------------------------------------------------- start

def start(run, progress_cls) -> None:
    """Fresh or resumed states, plans and rewind points of every ticket of ``run``."""
    eng, ticks = run.engine, run.tickets
    sources = [resume_source(t.cfg) for t in ticks]
    if any(t.cfg.run.resume for t in ticks) and not all(sources):
        run.log(f"--resume: {', '.join(str(t.paths.checkpoints) for t, s in zip(ticks, sources) if s is None)} "
                f"holds no checkpoint yet; starting the run")
        sources = [None] * len(ticks)
    _startup_line(run)
    if all(sources):
        _resume(run, sources, progress_cls)
    else:
        per = [_fresh(run, k) for k in range(len(ticks))]
        run.states = rounds.stack([p[0] for p in per])
        run.plan = rounds.stack([p[1] for p in per])
        run.rewind = rounds.stack([p[2] for p in per])
        for t in ticks:
            t.progress = progress_cls()
    for t in ticks:
        resolved = dict(t.cfg.to_dict(), seed=t.seed, resume=False, checkpoint=None)
        if parallel.is_primary():
            atomic_write(t.paths.config, json.dumps(resolved, indent=1))
        t.predicted_norm_rel, lines = penalty_check(t.cfg, eng.schedules)
        for line in lines:
            run.log((f"seed {t.seed}: " if len(ticks) > 1 else "") + line)
    cfg = ticks[0].cfg
    if cfg.optim.distill and ticks[0].progress.round > 0:
        run.teacher = load_teacher(run)
    _set_teacher(run, ticks[0].progress.round)
    run.states, run.plan, run.rewind = eng.place((run.states, run.plan, run.rewind))


def _startup_line(run) -> None:
    eng, cfg = run.engine, run.tickets[0].cfg
    ds, p = eng.ds, cfg.prune
    where = (str(run.tickets[0].paths.root) if len(run.tickets) == 1 else
             ", ".join(str(t.paths.root) for t in run.tickets))
    run.log(f"{cfg.data.dataset}: {len(ds.train_y)} train / {len(ds.val_y)} val / "
            f"{len(ds.test_y)} test images {'x'.join(map(str, ds.image_shape))}, "
            f"{ds.num_classes} classes; {cfg.model.arch}; {run.rounds} round(s) x "
            f"{run.epochs} epochs, struct {p.struct}; {len(run.tickets)} ticket(s) writing "
            f"to {where}. Compiling (a minute or two on a CPU)...")


def _fresh(run, k: int):
    eng, t = run.engine, run.tickets[k]
    template = eng.fresh_state(t.seed)
    masks = rounds.initial_masks(eng.net, template.params, t.cfg.prune)
    state = _load_or_make_init(run, k, template)
    plan = rounds.make_plan(eng.net, eng.param_shapes, t.cfg.prune, masks, hyper=eng.hyper(t.cfg))
    state = state.replace(params=masks_lib.apply_masks(state.params, plan.step.masks))
    rewind = snapshot(state)
    state = rounds.start_round(state, eng.tx, jax.random.PRNGKey(t.seed), 0)
    return state, plan, rewind


def _load_or_make_init(run, k: int, state):
    """W0 from --init if it exists, else written there (two runs can share a ticket's init)."""
    t, eng = run.tickets[k], run.engine
    init_dir = t.paths.init(t.cfg.run.init)
    template = {"params": state.params, "batch_stats": state.batch_stats}
    if ckpt.latest_step(init_dir) is not None:
        try:  # restore checks names and shapes against the network's
            w0, _ = ckpt.restore(init_dir, template)
        except ckpt.CheckpointError as e:
            raise RunError(f"--init {init_dir} cannot be used for this network: {e.reason}"
                           ) from None
        run.log(f"loaded initialization from {init_dir}")
    else:
        w0 = template
        ckpt.save(init_dir, 0, w0, {"arch": t.cfg.model.arch, "dataset": t.cfg.data.dataset,
                                    "seed": t.seed, **run.ticket_meta(k)})
    if t.cfg.prune.prune_type == "pt":
        try:
            variables, report = pretrained_lib.load_pretrained(
                t.cfg.prune.pretrained, w0, with_report=True, fresh_stem_and_head=True,
                stem=eng.net.stem)
        except pretrained_lib.PretrainedError as e:
            raise RunError(str(e)) from None
        run.log(f"--pretrained {t.cfg.prune.pretrained}: loaded {len(report.loaded)} arrays, "
                f"kept {len(report.fresh)} freshly initialized"
                + (f" ({', '.join(p for p, _ in report.fresh[:4])})" if report.fresh else ""))
        w0 = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    return state.replace(params=w0["params"], batch_stats=w0["batch_stats"])


def _resume(run, sources, progress_cls) -> None:
    """Every ticket from its newest usable checkpoint (unusable ones are set aside with a
    line each, see ``checkpoint.restore_newest_good``); tickets save one after another,
    so a kill can leave one a checkpoint ahead: all then resume from the older one."""
    eng, ticks = run.engine, run.tickets
    templates, found = [], []
    for t, source in zip(ticks, sources):
        template = eng.fresh_state(t.seed)
        masks = rounds.initial_masks(eng.net, template.params, t.cfg.prune)
        templates.append({"state": template, "masks": masks, "channel_masks": masks,
                          "rewind": snapshot(template)})
        found.append(ckpt.restore_newest_good(source, templates[-1], check=_finite_state,
                                              log=run.log))
    target = min(step for _, _, step in found)
    per = []
    for k, (t, source) in enumerate(zip(ticks, sources)):
        tree, meta, step = found[k]
        if step != target:
            tree, meta = ckpt.restore(source, templates[k], step=target)
        plan = rounds.make_plan(eng.net, eng.param_shapes, t.cfg.prune, tree["masks"],
                                tree["channel_masks"] if meta["has_channel_masks"] else None,
                                hyper=eng.hyper(t.cfg))
        fields = {f for f in progress_cls.__dataclass_fields__}
        t.progress = progress_cls(**{key: v for key, v in meta.items() if key in fields})
        per.append((tree["state"], plan, tree["rewind"]))
        run.log(f"resuming {t.paths.root} at round {t.progress.round}, epoch {t.progress.epoch}")
    run.states = rounds.stack([p[0] for p in per])
    run.plan = rounds.stack([p[1] for p in per])
    run.rewind = rounds.stack([p[2] for p in per])


# A round's penalized weights should end below this fraction of their norm. Measured
# (docs/comparison.md, README): at 2% applying S cost at most one test image; at 6% it
# cost 2 to 22 points in a narrow network, at 12 to 28% 27 to 69 points.
PENALTY_BUDGET = 0.03
# What a suggested fix aims the prediction at. The loss gradient holds a penalized
# weight near (its loss gradient) / lambda, so the measured fraction stays above the
# prediction: 2-3% where the prediction was 0.06%, 5.5-8% where 1.5%, 12-17% where
# 6.8% (res8s_narrow on digits, docs/comparison.md). Under 0.1% it ends under 3%.
SUGGESTION_TARGET = 0.001


def schedule_values(schedules, hyper) -> tuple:
    """(lambda, lr) at every step of a round, host float64 arrays."""
    steps = jnp.arange(schedules.total_steps, dtype=jnp.int32)
    lam = jax.vmap(lambda t: schedules.reg_lambda(t, hyper))(steps)
    lr = jax.vmap(lambda t: schedules.lr(t, hyper.lr))(steps)
    return np.asarray(lam, np.float64), np.asarray(lr, np.float64)


def predicted_norm_fraction(schedules, hyper, optim_cfg) -> float:
    """The fraction of their norm the RSST penalty alone leaves to the penalized
    weights by the end of a round (``regularizers.remaining_norm_fraction``)."""
    lam, lr = schedule_values(schedules, hyper)
    return regularizers.remaining_norm_fraction(lr, lam, optim_cfg.momentum,
                                                optim_cfg.weight_decay)


def suggest_granularity(schedules, hyper, optim_cfg, target: float) -> Optional[float]:
    """The smallest ``--reg_granularity_prune`` (to 2 significant digits) whose round
    leaves at most ``target`` of the norm and stays stable; None if none does."""
    def frac(g):
        h = hyper.replace(reg_g=jnp.float32(g))
        lam, lr = schedule_values(schedules, h)
        if regularizers.first_unstable_step(lam, lr, optim_cfg.momentum, len(lr)) is not None:
            return None
        return regularizers.remaining_norm_fraction(lr, lam, optim_cfg.momentum,
                                                    optim_cfg.weight_decay)
    g = float(hyper.reg_g) or 1e-3
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


def penalty_report(schedules, hyper, cfg, values=None) -> tuple[float, Optional[str]]:
    """(predicted fraction, a warning line or None) for an RSST configuration on SGD;
    ``values``: ``schedule_values(schedules, hyper)`` when already computed."""
    lam, lr = values if values is not None else schedule_values(schedules, hyper)
    frac = regularizers.remaining_norm_fraction(lr, lam, cfg.optim.momentum,
                                                cfg.optim.weight_decay)
    if frac <= PENALTY_BUDGET:
        return frac, None
    g = suggest_granularity(schedules, hyper, cfg.optim, SUGGESTION_TARGET)
    fix = (f"pass --reg_granularity_prune {g:g} (the penalty alone then leaves "
           f"{100 * predicted_norm_fraction(schedules, hyper.replace(reg_g=jnp.float32(g)), cfg.optim):.2f}%)"
           if g is not None else "raise --reg_granularity_prune")
    return frac, (f"warning: the RSST penalty alone leaves the penalized weights "
                  f"{100 * frac:.1f}% of their norm by the end of each round (above "
                  f"{100 * PENALTY_BUDGET:.0f}%), so applying the channel mask will cost "
                  f"accuracy; {fix}, or decay the learning rate later in the round "
                  f"(--decreasing_lr {cfg.optim.decreasing_lr} now)")


def penalty_check(cfg, schedules) -> tuple[Optional[float], list[str]]:
    """What a run (and its --dry_run) says of its RSST penalty before training: the
    stability of SGD under it and what it leaves of the penalized weights' norm by
    each round's end. (predicted fraction, lines); (None, []) unless the run has RSST
    rounds on SGD."""
    p = cfg.prune
    if p.struct != "rsst" or cfg.optim.optimizer != "sgd" or p.pruning_times < 2:
        return None, []
    hyper = hyper_of(cfg)
    lam, lr = schedule_values(schedules, hyper)
    lines = []
    step = regularizers.first_unstable_step(lam, lr, cfg.optim.momentum, schedules.total_steps)
    if step is not None:
        lines.append(f"warning: lr * lambda crosses 2 * (1 + momentum) at step {step} of "
                     f"{schedules.total_steps} in each RSST round; SGD will diverge there. "
                     f"Set --reg_upper_limit or a smaller --reg_granularity_prune")
    frac, warning = penalty_report(schedules, hyper, cfg, (lam, lr))
    lines.append(f"RSST penalty: by the end of each round the penalty alone leaves the "
                 f"penalized weights {100 * frac:.2f}% of their norm (at most "
                 f"{100 * PENALTY_BUDGET:.0f}% wanted; a round's line shows the measured "
                 f"fraction)")
    return frac, lines + ([warning] if warning else [])


# --------------------------------------------------------------------------- rounds

def load_teacher(run):
    """The dense round-0 network (round_0/final), teacher of later rounds with --distill."""
    t, eng = run.tickets[0], run.engine
    if ckpt.latest_step(t.paths.final(0)) is None:
        return None
    template = eng.fresh_state(t.seed)
    tree, _ = ckpt.restore(t.paths.final(0), {
        "params": template.params, "batch_stats": template.batch_stats,
        "masks": rounds.initial_masks(eng.net, template.params, t.cfg.prune)})
    return {"params": tree["params"], "batch_stats": tree["batch_stats"]}


def _set_teacher(run, round_idx: int) -> None:
    """--distill: the plan carries the teacher (round 0 trains the teacher itself: alpha 0
    and a finite stand-in that is not the state's own, donated, buffers)."""
    cfg = run.tickets[0].cfg
    if not cfg.optim.distill:
        return
    if round_idx == 0 or run.teacher is None:
        teacher, alpha = copy(run.states.variables), 0.0
    else:
        teacher = rounds.stack([run.teacher])
        alpha = cfg.optim.kd_alpha
    run.plan = run.plan.replace(step=run.plan.step.replace(
        teacher=teacher, kd_alpha=jnp.full((len(run.tickets),), alpha, jnp.float32)))


def plan_next_round(run, r: int) -> None:
    """After round r: prune and plan round r+1 of every ticket, then rewind it."""
    eng, ticks = run.engine, run.tickets

    def one(k, state, plan, rewind):
        t = ticks[k]
        masks, channel = rounds.prune_round(
            eng.net, state.variables, plan.masks, t.cfg.prune, r,
            key=jax.random.PRNGKey(t.seed), mean=eng.ds.mean, std=eng.ds.std,
            score_batches=lambda: eng.score_batches(t.seed, r, t.cfg.prune.criteria_batches))
        nxt = rounds.make_plan(eng.net, eng.param_shapes, t.cfg.prune, masks, channel,
                               hyper=eng.hyper(t.cfg))
        point = rounds.rewind_to(copy(rewind), nxt)
        state = state.replace(params=point["params"], batch_stats=point["batch_stats"])
        return rounds.start_round(state, eng.tx, jax.random.PRNGKey(t.seed), r + 1), nxt

    plain = run.plan.replace(step=run.plan.step.replace(teacher=None, kd_alpha=jnp.zeros(
        (len(ticks),), jnp.float32)))
    live = [k for k, t in enumerate(ticks) if t.failed is None]
    done = {k: one(k, rounds.ticket(run.states, k), rounds.ticket(plain, k),
                   rounds.ticket(run.rewind, k)) for k in live}
    # A stopped ticket's lane computes a live one's copy, never written anywhere.
    outs = [done.get(k, done[live[0]]) for k in range(len(ticks))]
    run.states = rounds.stack([o[0] for o in outs])
    run.plan = rounds.stack([o[1] for o in outs])
    _set_teacher(run, r + 1)
    run.states, run.plan = eng.place((run.states, run.plan))


__all__ = ["RunError", "start", "resume_source", "plan_next_round", "load_teacher", "snapshot",
           "copy", "replace_ticket", "print_flushed", "penalty_report", "penalty_check",
           "PENALTY_BUDGET", "SUGGESTION_TARGET"]
