"""The command's run: a short loop over rounds and epochs of K tickets, with callbacks.

``run(configs)`` trains the tickets of ``configs`` (one configuration, or several that
differ only in groupable settings: seeds, learning rate, lambda schedule, rates,
criteria) as one program on an :class:`engine.Engine`; each ticket writes an ordinary
run directory (``paths.RunPaths``) that resumes, analyses and compares on its own. Per
round: train the epochs (``Engine.train_epoch``), evaluate, end the round (where the
plan says so, apply the channel masks S: accuracy before and after, BatchNorm
re-estimation), then the method chooses the next round's masks
(``starting.next_round``) and the tickets rewind. The method's hooks get values of one
ticket (``methods.TicketValues``) and return values; side effects are callbacks
(``rsst_jax.callbacks``). Where a run stands is each ticket's ``Progress`` (with the
method's host state), saved with every checkpoint, so a resumed run continues where it
stopped and ends with the numbers of an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rsst_jax import callbacks as cb
from rsst_jax import config as config_lib
from rsst_jax import masks as masks_lib
from rsst_jax import parallel
from rsst_jax import paths as paths_lib
from rsst_jax import methods, rounds, starting, trees
from rsst_jax import train as train_lib
from rsst_jax import engine as engine_lib
from rsst_jax.engine import Engine

TrainingDiverged = cb.TrainingDiverged
RunError = starting.RunError


@dataclasses.dataclass
class Progress:
    """Where a ticket stands; saved as JSON with every checkpoint."""
    round: int = 0
    epoch: int = 0                 # epochs finished in this round
    history: list = dataclasses.field(default_factory=list)   # one row per epoch, all rounds
    rows: list = dataclasses.field(default_factory=list)      # one summary row per round
    best: Optional[dict] = None
    elapsed: float = 0.0           # training wall time so far, seconds
    round_start: float = 0.0
    method_info: dict = dataclasses.field(default_factory=dict)  # the method's host state


@dataclasses.dataclass
class LiveTicket:
    """A ticket being trained by this run: its configuration, run directory and progress
    (``tickets.Ticket`` is a saved one, opened from a checkpoint)."""
    cfg: config_lib.Config
    paths: paths_lib.RunPaths
    progress: Progress
    failed: Optional[BaseException] = None

    @property
    def seed(self) -> int:
        return self.cfg.run.resolved_seed


class RunState:
    """The driver's state, as callbacks see it: engine, tickets, the run's method,
    stacked states, plans (``rounds.RoundPlan``) and rewind points, and ``log``
    (``runs.Run`` is a finished or running run read back from its directory)."""

    def __init__(self, engine: Engine, tickets: list[LiveTicket], log: Callable[[str], None]):
        self.engine, self.tickets, self.log = engine, tickets, log
        cfg = tickets[0].cfg
        self.rounds, self.epochs = cfg.prune.pruning_times, cfg.optim.epochs
        self.batch_size = cfg.optim.batch_size
        self.method = methods.of(cfg)
        self.states = self.plan = self.rewind = None
        self.teacher = None

    def live_tickets(self) -> list[LiveTicket]:
        return [t for t in self.tickets if t.failed is None]

    @property
    def lead(self) -> Progress:
        """Where the run stands: the progress of its first ticket still training."""
        return self.live_tickets()[0].progress

    def fail(self, k: int, error: BaseException) -> None:
        """Ticket k stops here (its checkpoints stay as they are); with one ticket the
        error ends the run."""
        if len(self.tickets) == 1:
            raise error
        self.tickets[k].failed = error
        self.log(f"seed {self.tickets[k].seed} stopped: {error}")

    def ticket_meta(self, k: int) -> dict:
        """What a checkpoint of ticket k records about the network (for the loaders)."""
        return engine_lib.ticket_meta(self.engine, self.tickets[k].cfg)

    def checkpoint_tree(self, k: int) -> dict:
        plan = trees.ticket(self.plan, k)
        return {"state": trees.ticket(self.states, k), "masks": plan.masks,
                "channel_masks": plan.channel_masks, "rewind": trees.ticket(self.rewind, k)}

    def checkpoint_meta(self, k: int) -> dict:
        t = self.tickets[k]
        return dict(dataclasses.asdict(t.progress), has_channel_masks=self.plan.applies_s,
                    config=t.cfg.to_dict(), **self.ticket_meta(k))

    def values(self, k: int, history: Optional[list] = None):
        """Ticket k as its method's hooks see it (``methods.TicketValues``)."""
        t = self.tickets[k]
        return starting.ticket_values(self.engine, t, trees.ticket(self.states, k),
                                      trees.ticket(self.plan, k), round_idx=t.progress.round,
                                      epoch=t.progress.epoch, history=history)

    def recalibrate_bn(self, after_s: bool = False) -> Optional[float]:
        """--bn_recalibrate N in a round that applies S (or, ``after_s``, one that has
        just applied it): every ticket's BatchNorm statistics re-estimated over N training
        batches (``engine.recalibrate_bn``), kept in the state (so in its checkpoints);
        returns the seconds it took, None when off or in another round."""
        n = engine_lib.bn_count(self.engine, self.tickets[0].cfg.optim.bn_recalibrate)
        if not n or not (after_s or self.plan.applies_s):
            return None
        t0 = time.time()
        self.states = engine_lib.recalibrate_bn(self.engine, self.states, n)
        jax.block_until_ready(self.states.batch_stats)
        return round(time.time() - t0, 4)


def run(configs, *, callbacks: Optional[Sequence[cb.Callback]] = None, progress: bool = True,
        log: Optional[Callable[[str], None]] = None, dataset=None) -> list[list[dict]]:
    """Run (or resume) ``configs`` (a Config or a list of groupable ones) to the end;
    returns each ticket's summary rows."""
    configs = [configs] if isinstance(configs, config_lib.Config) else list(configs)
    log = log or starting.print_flushed
    engine = Engine(configs, dataset=dataset)
    if engine_lib.bn_count(engine, configs[0].optim.bn_recalibrate):
        engine_lib.bn_batches(engine, configs[0].optim.bn_recalibrate)  # fails before training
    tickets = [LiveTicket(c, paths_lib.RunPaths.of(c.run.save_dir), Progress()) for c in configs]
    callbacks = list(callbacks if callbacks is not None
                     else cb.default_callbacks(configs[0], progress=progress))
    primary = parallel.is_primary()
    if not primary:  # several processes: process 0 prints and writes the run's files
        log = _silent
        callbacks = [c for c in callbacks if getattr(c, "every_process", False)]
    for t in tickets:
        t.paths.root.mkdir(parents=True, exist_ok=True)
    locks = cb.RunLocks([t.paths.root for t in tickets] if primary else [], log=log).acquire()
    r = RunState(engine, tickets, log)
    try:
        begun = starting.start(engine, tickets, log, Progress)
        r.states, r.plan, r.rewind, r.teacher = begun.states, begun.plan, begun.rewind, begun.teacher
        for t, p in zip(tickets, begun.progress):
            t.progress = p
        for c in callbacks:
            c.run_start(r)
        while r.live_tickets() and r.lead.round < r.rounds:
            _train_round(r, callbacks)
        if all(t.failed is None for t in tickets):
            for c in callbacks:
                c.run_finished(r)
    finally:
        for c in callbacks:
            c.run_end(r)
        locks.run_end(r)
    failed = [t.failed for t in tickets if t.failed is not None]
    if failed:
        raise failed[0]
    return [t.progress.rows for t in tickets]


def _silent(line: str) -> None:
    pass


def _train_round(run: RunState, callbacks) -> None:
    ticks = run.tickets
    r = run.lead.round
    if run.lead.epoch == 0:
        for k, t in enumerate(ticks):
            p = t.progress
            p.best = {"val_acc": -1.0, "epoch": -1, "test_acc": None}
            p.round_start = p.elapsed
            p.method_info = dict(run.method.round_start(run.values(k)))
    for epoch in range(run.lead.epoch + 1, run.epochs + 1):
        _train_epoch(run, callbacks, r, epoch)
        if not run.live_tickets():
            return
    t1 = time.time()
    rows = _finish_round(run, r)
    for c in callbacks:
        c.round_finished(run, r, rows)
    if r == 0 and ticks[0].cfg.optim.distill:
        run.teacher = starting.load_teacher(run.engine, ticks[0])
    if r + 1 < run.rounds:
        run.states, run.plan = starting.next_round(run.engine, ticks, run.states, run.plan,
                                                   run.rewind, r, run.teacher)
    for t, row in zip(ticks, rows):
        p = t.progress
        p.elapsed += time.time() - t1
        if row is None:
            continue
        row.update(round_time_s=round(p.elapsed - p.round_start, 2),
                   wall_time_s=round(p.elapsed, 2))
        p.rows.append(row)
        p.round, p.epoch = r + 1, 0
    for c in callbacks:
        c.round_end(run, r, rows)


def _train_epoch(run: RunState, callbacks, r: int, epoch: int) -> None:
    """Epoch ``epoch`` (from 1) of round r for every ticket: train, evaluate, record."""
    eng, ticks = run.engine, run.tickets
    t0 = time.time()
    scales = [run.method.epoch_scale(run.values(k)) for k in range(len(ticks))]
    run.plan = run.plan.replace(step=run.plan.step.replace(
        reg_scale=jnp.asarray(scales, jnp.float32)))
    perms = engine_lib.epoch_perms(eng, [t.seed for t in ticks], r, epoch - 1)
    for c in callbacks:
        c.epoch_start(run, r, epoch, perms.shape[1])
    run.states, metrics = eng.train_epoch(
        run.states, run.plan.step, perms,
        on_chunk=lambda done, n, m: [c.chunk(run, done, n, m) for c in callbacks])
    for c in callbacks:
        c.epoch_trained(run, r, epoch, metrics)
    bn_time = run.recalibrate_bn()
    val = eng.evaluate(run.states.variables, "val")
    test = eng.evaluate(run.states.variables, "test")
    rows = []
    for k, t in enumerate(ticks):
        if t.failed is None and not _params_finite(run, k):
            run.fail(k, TrainingDiverged(
                f"parameters became NaN/Inf in round {r}, epoch {epoch}; the last good "
                f"checkpoint is kept. Lower --lr or set --reg_upper_limit"))
        if t.failed is not None:
            rows.append(None)
            continue
        rows.append(_epoch_row(run, k, r, epoch, metrics, val[k], test[k], t0))
        if bn_time is not None:
            rows[-1]["bn_time_s"] = bn_time
    for c in callbacks:
        c.epoch_end(run, r, epoch, rows)


def _params_finite(run: RunState, k: int) -> bool:
    return train_lib.tree_is_finite(trees.ticket(run.states.params, k))


def _epoch_row(run: RunState, k: int, r: int, epoch: int, metrics, val, test, t0) -> dict:
    t, p = run.tickets[k], run.tickets[k].progress
    finite = metrics["finite"][k].astype(bool)
    loss, correct = metrics["loss"][k], metrics["correct"][k]
    row = {"round": r, "epoch": epoch,
           "train_loss": float(loss[finite].mean()) if finite.any() else float("nan"),
           "train_acc": 100.0 * float(correct[finite].sum())
           / max(1, int(finite.sum()) * run.batch_size),
           "val_acc": val["acc"], "val_loss": val["loss"], "test_acc": test["acc"],
           "test_loss": test["loss"], "lr": float(metrics["lr"][k, -1])}
    row.update(run.method.epoch_values(run.values(k), {key: np.asarray(v[k])
                                                       for key, v in metrics.items()}))
    if val["acc"] > p.best["val_acc"]:  # the Checkpointer saves round_<r>/best
        p.best = {"val_acc": val["acc"], "epoch": epoch, "test_acc": test["acc"]}
    if r == 0 and t.cfg.prune.prune_type == "rewind_lt" and epoch == t.cfg.prune.rewind_epoch:
        run.rewind = trees.replace_ticket(run.rewind, k, starting.snapshot(
            trees.ticket(run.states, k)))
    row["time_s"] = time.time() - t0
    p.history.append(row)
    p.epoch = epoch
    p.elapsed += time.time() - t0
    return row


def _finish_round(run: RunState, r: int) -> list:
    """The round's summary rows: what training tells; for a round that ends by applying
    the channel masks S (its plan's ``applies_s``), S applied to every ticket with the test
    accuracy before and after (and the BatchNorm statistics re-estimated first with
    --bn_recalibrate); what the method adds; the final masks' densities."""
    rows = [None if t.failed is not None else
            rounds.summary_row(r, run.epochs, t.progress.best, t.progress.history[-1])
            for t in run.tickets]
    values = [None if row is None else run.values(k) for k, row in enumerate(rows)]
    if run.plan.applies_s:
        _apply_channel_masks(run, rows)
    for k, row in enumerate(rows):
        if row is None:
            continue
        row.update(run.method.round_values(values[k], dict(row)))
        m = trees.ticket(run.plan.masks, k)
        row.update(remaining_weight_pct=100.0 * masks_lib.density(m),
                   channel_sparsity_pct=100.0 * masks_lib.channel_sparsity(m),
                   devices=run.engine.device_count)
    return rows


def _apply_channel_masks(run: RunState, rows: list) -> None:
    """The end of a round that applies S: record the test accuracy before, apply S
    (M := S) to every ticket, re-estimate BatchNorm statistics (--bn_recalibrate),
    evaluate again."""
    eng, ticks = run.engine, run.tickets
    for t, row in zip(ticks, rows):
        if row is not None:
            row["acc_before_s"] = t.progress.history[-1]["test_acc"]
    run.states, run.plan = trees.for_each(
        lambda k, s, pl: rounds.apply_channel_masks(eng.net, eng.param_shapes,
                                                    ticks[k].cfg.prune, s, pl),
        len(ticks), run.states, run.plan)
    recalibrated = run.recalibrate_bn(after_s=True) is not None
    val = eng.evaluate(run.states.variables, "val")
    test = eng.evaluate(run.states.variables, "test")
    for k, row in enumerate(rows):
        if row is not None:
            row.update(final_val_acc=val[k]["acc"], final_test_acc=test[k]["acc"],
                       acc_after_s=test[k]["acc"])
            if recalibrated:
                row["bn_recalibrate"] = engine_lib.bn_count(eng, ticks[k].cfg.optim.bn_recalibrate)


__all__ = ["run", "RunState", "LiveTicket", "Progress", "TrainingDiverged", "RunError"]
