"""How the driver's tickets start, resume and move to the next round, as functions that
return the run's state (the driver keeps it).

``start(engine, tickets, log)`` gives every ticket its state, plan, rewind point and
progress (a :class:`Start`): from its newest usable resume checkpoint (``--resume``),
else from W0 (``--init`` or ``init/``, made from the seed and saved there;
``--prune_type pt`` merges the pretrained weights in). ``next_round(...)`` asks each
trained ticket's method for the next round's masks, plans that round and rewinds the
ticket. Files written here: config.json, and W0 where it does not exist yet.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from rsst_jax import checkpoint as ckpt
from rsst_jax import engine as engine_lib
from rsst_jax import config as config_lib
from rsst_jax import masks as masks_lib
from rsst_jax import pretrained as pretrained_lib
from rsst_jax import paths as paths_lib
from rsst_jax import methods, parallel, rounds, trees
from rsst_jax import train as train_lib
from rsst_jax.paths import atomic_write


class RunError(RuntimeError):
    """A run directory or input that cannot be used; the message says what to do."""


def print_flushed(message: str) -> None:
    print(message, flush=True)  # flushed: runs are often followed through a log file


def snapshot(state) -> dict:
    """A rewind point: an independent copy of the state's weights and statistics."""
    return trees.copy({"params": state.params, "batch_stats": state.batch_stats})


def resume_source(cfg) -> Optional[pathlib.Path]:
    """The checkpoint directory a run of ``cfg`` resumes from, or None when it starts
    afresh; raises RunError where the run must not go on (a --save_dir holding a run
    without --resume, nothing to resume from, or checkpoints made with other flags).
    ``--resume`` on a run killed before its first checkpoint starts afresh (None).
    The configuration is compared with the newest checkpoint whose metadata reads (an
    unreadable one is set aside when the run restores, see ``_resume``)."""
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
            meta = ckpt.read_meta(source, step)
        except ckpt.CheckpointError:
            continue
        if "method_info" not in meta:
            raise RunError(f"--resume: {source} was written by an earlier version of rsst-jax "
                           f"(before a method kept its own state in the checkpoints); finish "
                           f"it with that version, or start a new --save_dir")
        saved = meta.get("config", {})
        listed = config_lib.semantic_diffs(saved, cfg.to_dict())
        if listed:
            raise RunError(f"--resume: {source} was made with a different configuration: "
                           f"{listed}; resume with the same flags, or start a new --save_dir")
        break
    return source


def _finite_state(tree, meta) -> Optional[str]:
    """``restore_newest_good``'s check: a resume checkpoint holds finite weights (a run
    stops before it writes NaN/Inf, so any there is damage)."""
    for name in ("state", "rewind"):
        if not train_lib.tree_is_finite(tree[name]):
            return f"non-finite values in its {name}"
    return None


# --------------------------------------------------------------------------- start

@dataclasses.dataclass
class Start:
    """Where a run's tickets begin: stacked ``states``, ``plan`` (``rounds.RoundPlan``)
    and ``rewind`` points placed where the programs read them, each ticket's
    ``progress`` (with its method's host state, ``method_info``) and the ``teacher``
    (--distill after round 0)."""
    states: Any
    plan: Any
    rewind: Any
    progress: list
    teacher: Any = None


def start(engine, tickets, log: Callable[[str], None], progress_cls) -> Start:
    """Fresh or resumed states, plans and rewind points of every ticket (``tickets``:
    the driver's, each with ``cfg``, ``paths`` and ``seed``); writes config.json."""
    sources = [resume_source(t.cfg) for t in tickets]
    if any(t.cfg.run.resume for t in tickets) and not all(sources):
        log(f"--resume: {', '.join(str(t.paths.checkpoints) for t, s in zip(tickets, sources) if s is None)} "
            f"holds no checkpoint yet; starting the run")
        sources = [None] * len(tickets)
    log(_startup_line(engine, tickets))
    if all(sources):
        per, progress = _resume(engine, tickets, sources, log, progress_cls)
    else:
        per = [_fresh(engine, t, log) for t in tickets]
        progress = [progress_cls() for _ in tickets]
    states, plan, rewind = (trees.stack([p[i] for p in per]) for i in range(3))
    for t, p in zip(tickets, progress):
        resolved = dict(t.cfg.to_dict(), seed=t.seed, resume=False, checkpoint=None)
        if parallel.is_primary():
            atomic_write(t.paths.config, json.dumps(resolved, indent=1))
        info, lines = methods.of(t.cfg).start(t.cfg, engine.schedules)
        if not all(sources):  # a resumed ticket keeps the state its checkpoint holds
            p.method_info = info
        for line in lines:
            log((f"seed {t.seed}: " if len(tickets) > 1 else "") + line)
    round_idx = progress[0].round
    teacher = None
    if tickets[0].cfg.optim.distill and round_idx > 0:
        teacher = load_teacher(engine, tickets[0])
    plan = with_teacher(plan, states, teacher, tickets[0].cfg, round_idx)
    states, plan, rewind = engine.place((states, plan, rewind))
    return Start(states, plan, rewind, progress, teacher)


def _startup_line(engine, tickets) -> str:
    cfg, ds = tickets[0].cfg, engine.ds
    where = (str(tickets[0].paths.root) if len(tickets) == 1 else
             ", ".join(str(t.paths.root) for t in tickets))
    return (f"{cfg.data.dataset}: {len(ds.train_y)} train / {len(ds.val_y)} val / "
            f"{len(ds.test_y)} test images {'x'.join(map(str, ds.image_shape))}, "
            f"{ds.num_classes} classes; {cfg.model.arch}; {cfg.prune.pruning_times} round(s) x "
            f"{cfg.optim.epochs} epochs, struct {cfg.prune.struct}; {len(tickets)} ticket(s) "
            f"on {engine_lib.devices_text(engine)} ({jax.default_backend()}) writing to {where}. "
            f"Compiling (a minute or two on a CPU)...")


def _fresh(engine, t, log):
    template = engine.fresh_state(t.seed)
    masks = rounds.initial_masks(engine.net, template.params, t.cfg.prune)
    state = _load_or_make_init(engine, t, template, log)
    plan = engine.plan(t.cfg, masks)
    state = state.replace(params=masks_lib.apply_masks(state.params, plan.step.masks))
    rewind = snapshot(state)
    state = rounds.start_round(state, engine.tx, jax.random.PRNGKey(t.seed), 0)
    return state, plan, rewind


def _load_or_make_init(engine, t, state, log):
    """W0 from --init if it exists, else written there (two runs can share a ticket's init)."""
    init_dir = t.paths.init(t.cfg.run.init)
    template = {"params": state.params, "batch_stats": state.batch_stats}
    if ckpt.latest_step(init_dir) is not None:
        try:  # restore checks names and shapes against the network's
            w0, _ = ckpt.restore(init_dir, template)
        except ckpt.CheckpointError as e:
            raise RunError(f"--init {init_dir} cannot be used for this network: {e.reason}"
                           ) from None
        log(f"loaded initialization from {init_dir}")
    else:
        w0 = template
        ckpt.save(init_dir, 0, w0, {"arch": t.cfg.model.arch, "dataset": t.cfg.data.dataset,
                                    "seed": t.seed, **engine_lib.ticket_meta(engine, t.cfg)})
    if t.cfg.prune.prune_type == "pt":
        try:
            variables, report = pretrained_lib.load_pretrained(
                t.cfg.prune.pretrained, w0, with_report=True, fresh_stem_and_head=True,
                stem=engine.net.stem)
        except pretrained_lib.PretrainedError as e:
            raise RunError(str(e)) from None
        log(f"--pretrained {t.cfg.prune.pretrained}: loaded {len(report.loaded)} arrays, "
            f"kept {len(report.fresh)} freshly initialized"
            + (f" ({', '.join(p for p, _ in report.fresh[:4])})" if report.fresh else ""))
        w0 = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    return state.replace(params=w0["params"], batch_stats=w0["batch_stats"])


def _resume(engine, tickets, sources, log, progress_cls):
    """Every ticket from its newest usable checkpoint (unusable ones are set aside with a
    line each, see ``checkpoint.restore_newest_good``); tickets save one after another,
    so a kill can leave one a checkpoint ahead: all then resume from the older one.
    Returns ([(state, plan, rewind)], [progress]) per ticket."""
    templates, found = [], []
    for t, source in zip(tickets, sources):
        template = engine.fresh_state(t.seed)
        masks = rounds.initial_masks(engine.net, template.params, t.cfg.prune)
        templates.append({"state": template, "masks": masks, "channel_masks": masks,
                          "rewind": snapshot(template)})
        found.append(ckpt.restore_newest_good(source, templates[-1], check=_finite_state,
                                              log=log))
    target = min(step for _, _, step in found)
    per, progress = [], []
    fields = set(progress_cls.__dataclass_fields__)
    for k, (t, source) in enumerate(zip(tickets, sources)):
        tree, meta, step = found[k]
        if step != target:
            tree, meta = ckpt.restore(source, templates[k], step=target)
        plan = engine.plan(t.cfg, tree["masks"],
                           tree["channel_masks"] if meta["has_channel_masks"] else None)
        progress.append(progress_cls(**{key: v for key, v in meta.items() if key in fields}))
        per.append((tree["state"], plan, tree["rewind"]))
        log(f"resuming {t.paths.root} at round {progress[-1].round}, epoch {progress[-1].epoch}")
    return per, progress


# --------------------------------------------------------------------------- rounds

def load_teacher(engine, t):
    """The dense round-0 network of ticket ``t`` (round_0/final), teacher of later rounds
    with --distill; None when it is not there."""
    if ckpt.latest_step(t.paths.final(0)) is None:
        return None
    template = engine.fresh_state(t.seed)
    tree, _ = ckpt.restore(t.paths.final(0), {
        "params": template.params, "batch_stats": template.batch_stats,
        "masks": rounds.initial_masks(engine.net, template.params, t.cfg.prune)})
    return {"params": tree["params"], "batch_stats": tree["batch_stats"]}


def with_teacher(plan, states, teacher, cfg, round_idx: int):
    """--distill: ``plan`` (stacked) carrying the teacher (round 0 trains the teacher
    itself: alpha 0 and a finite stand-in that is not the states' own, donated, buffers);
    without --distill ``plan`` as it is."""
    if not cfg.optim.distill:
        return plan
    k = plan.step.reg_scale.shape[0]  # tickets
    if round_idx == 0 or teacher is None:
        variables, alpha = trees.copy(states.variables), 0.0
    else:
        variables, alpha = trees.stack([teacher]), cfg.optim.kd_alpha
    return plan.replace(step=plan.step.replace(
        teacher=variables, kd_alpha=jnp.full((k,), alpha, jnp.float32)))


def ticket_values(engine, t, state, plan, *, round_idx: int, epoch: int, history=None):
    """What a method's hooks see of ticket ``t`` (``methods.TicketValues``): its
    configuration, weights, masks, penalty targets and state, and its epoch rows."""
    p = t.progress
    return methods.TicketValues(
        cfg=t.cfg, net=engine.net, round=round_idx, epoch=epoch, variables=state.variables,
        masks=plan.masks, channel_masks=plan.channel_masks if plan.applies_s else None,
        targets=plan.step.targets, penalty_state=engine_lib.penalty_state(engine, state.opt_state),
        info=dict(p.method_info), history=tuple(p.history if history is None else history))


def next_round(engine, tickets, states, plan, rewind, r: int, teacher=None):
    """After round r: each live ticket's method chooses round r+1's masks, which are
    planned; the ticket is rewound. Returns the stacked (states, plan), placed."""
    def one(k, state, plan_k, rewind_k):
        t = tickets[k]
        method = methods.of(t.cfg)
        scoring = methods.Scoring(
            batches=lambda: engine_lib.score_batches(engine, t.seed, r, t.cfg.prune.criteria_batches),
            key=jax.random.PRNGKey(t.seed), mean=engine.ds.mean, std=engine.ds.std)
        masks, channel = method.next_masks(
            ticket_values(engine, t, state, plan_k, round_idx=r, epoch=t.progress.epoch),
            scoring)
        nxt = engine.plan(t.cfg, masks, channel)
        point = rounds.rewind_to(trees.copy(rewind_k), nxt)
        state = state.replace(params=point["params"], batch_stats=point["batch_stats"])
        return rounds.start_round(state, engine.tx, jax.random.PRNGKey(t.seed), r + 1), nxt

    plain = plan.replace(step=plan.step.replace(teacher=None, kd_alpha=jnp.zeros(
        (len(tickets),), jnp.float32)))
    live = [k for k, t in enumerate(tickets) if t.failed is None]
    done = {k: one(k, trees.ticket(states, k), trees.ticket(plain, k),
                   trees.ticket(rewind, k)) for k in live}
    # A stopped ticket's lane computes a live one's copy, never written anywhere.
    outs = [done.get(k, done[live[0]]) for k in range(len(tickets))]
    states = trees.stack([o[0] for o in outs])
    plan = with_teacher(trees.stack([o[1] for o in outs]), states, teacher, tickets[0].cfg,
                        r + 1)
    return engine.place((states, plan))


__all__ = ["RunError", "Start", "start", "resume_source", "next_round", "ticket_values",
           "load_teacher",
           "with_teacher", "snapshot", "print_flushed"]
