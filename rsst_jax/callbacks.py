"""What a run does besides training, as callbacks of the driver (``rsst_jax.driver``).

Each callback reacts to a few of the driver's events and ignores the rest:

============================ ================================================================
event                        when
============================ ================================================================
``run_start(run)``           before the first epoch (fresh or resumed)
``epoch_start(run, r, e, n)`` before the n steps of epoch e (from 1) of round r
``chunk(run, done, n, m)``    after each compiled chunk (or step) of the epoch
``epoch_trained(run, r, e, metrics)`` the epoch's step metrics, [K, n] numpy arrays
``epoch_end(run, r, e, rows)`` after evaluation: one log row per ticket
``round_finished(run, r, rows)`` a round's final tickets (RSST: after S), before pruning
``round_end(run, r, rows)``   the next round planned: one summary row per ticket
``run_finished(run)``         every round done
``run_end(run)``              always, also when the run stops on an error
============================ ================================================================

``run`` is the driver's view (``driver.RunState``): the engine, the tickets (config, paths,
progress), the stacked states and plans, and ``log``.
"""
from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
from tqdm.auto import tqdm

from rsst_jax import checkpoint as ckpt
from rsst_jax import config as config_lib
from rsst_jax import paths as paths_lib
from rsst_jax import metrics as metrics_lib
from rsst_jax import runlock, trees
from rsst_jax.monitoring import TensorBoard, Wandb
from rsst_jax.paths import atomic_write  # defined in paths (starting needs it too); kept importable here


def summary_fields(methods=None) -> tuple[str, ...]:
    """The columns of summary.csv: the round, then every declared round metric
    (``rsst_jax.metrics``: the core's, then those of ``methods``, by default every
    registered method's), the round's times last."""
    return ("round", *(m.key for m in metrics_lib.declared(metrics_lib.ROUND_ROW, methods)))


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; the message names round, epoch and step."""


class Interrupted(SystemExit):
    """Raised by the RSST_JAX_STOP_AFTER test hook to stop a run between checkpoints."""


class Callback:
    """Base class: every event does nothing."""
    # In a run of several processes (parallel.init_distributed) only process 0 runs a
    # callback, unless it takes part in collective work or decides what the run does.
    every_process = False

    def run_start(self, run): pass
    def epoch_start(self, run, r: int, epoch: int, steps: int): pass
    def chunk(self, run, done: int, total: int, metrics: dict): pass
    def epoch_trained(self, run, r: int, epoch: int, metrics: dict): pass
    def epoch_end(self, run, r: int, epoch: int, rows: list): pass
    def round_finished(self, run, r: int, rows: list): pass
    def round_end(self, run, r: int, rows: list): pass
    def run_finished(self, run): pass
    def run_end(self, run): pass


def epoch_line(row: dict, epochs: int, method=None) -> str:
    """An epoch's line on the screen; ``method``'s declared epoch metrics add their part
    (``Metric.line``; RSST: lambda)."""
    return (f"round {row['round']} epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f}, "
            f"train {row['train_acc']:.2f}%, val {row['val_acc']:.2f}%, test "
            f"{row['test_acc']:.2f}%"
            + metrics_lib.line_parts(row, metrics_lib.of_method(method, metrics_lib.EPOCH_ROW)))


def round_line(row: dict, method=None) -> str:
    """A round's line on the screen: the core's part (with the accuracy before and after
    removing channels where the round ended so), then ``method``'s declared round
    metrics (RSST: the norm its penalty left)."""
    text = (f"round {row['round']}: remaining {row['remaining_weight_pct']:.2f}% weights, "
            f"channel sparsity {row['channel_sparsity_pct']:.2f}%, best val "
            f"{row['best_val_acc']:.2f}% (epoch {row['best_val_epoch']}), test at best val "
            f"{row['test_acc_at_best_val']:.2f}%, final test {row['final_test_acc']:.2f}%")
    text += metrics_lib.line_parts(row, metrics_lib.ROUND)
    text += metrics_lib.line_parts(row, metrics_lib.of_method(method, metrics_lib.ROUND_ROW))
    return text + f" ({row['round_time_s']:.0f} s)"


def _prefix(run, k: int) -> str:
    return f"seed {run.tickets[k].seed}: " if len(run.tickets) > 1 else ""


class ProgressBar(Callback):
    """A bar per epoch (the first ticket's loss, accuracy and, where the method has a
    lambda schedule, lambda) that leaves one line per epoch on screen."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.bar, self.correct = enabled, None, 0

    def epoch_start(self, run, r, epoch, steps):
        if not self.enabled:
            return
        self.correct = 0
        self.bar = tqdm(total=steps, leave=False, dynamic_ncols=True, disable=None,
                        desc=f"round {r}/{run.rounds - 1} epoch {epoch}/{run.epochs}")

    def chunk(self, run, done, total, metrics):
        if self.bar is None or self.bar.disable:
            return
        self.correct += int(np.sum(np.asarray(metrics["correct"])[0]))
        post = {"loss": f"{float(np.asarray(metrics['loss'])[0, -1]):.3f}",
                "acc": f"{100.0 * self.correct / (done * run.batch_size):.1f}"}
        if "reg_lambda" in metrics:
            post["lambda"] = f"{float(np.asarray(metrics['reg_lambda'])[0, -1]):.3g}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(done - self.bar.n)

    def epoch_end(self, run, r, epoch, rows):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.enabled:
            for k, row in enumerate(rows):
                if row is not None:
                    run.log(_prefix(run, k) + epoch_line(row, run.epochs, run.method))

    def run_end(self, run):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class EpochLog(Callback):
    """log.jsonl: one JSON line per epoch, rewritten from the checkpoint on resume."""

    def run_start(self, run):
        for t in run.live_tickets():
            atomic_write(t.paths.log, "".join(json.dumps(row) + "\n" for row in t.progress.history))

    def epoch_end(self, run, r, epoch, rows):
        for t, row in zip(run.tickets, rows):
            if row is not None:
                with open(t.paths.log, "a") as f:
                    f.write(json.dumps(row) + "\n")


class NanGuard(Callback):
    """--nan_policy: ``stop`` ends a ticket whose loss or gradients became NaN/Inf
    (TrainingDiverged names round, epoch and step; the last good checkpoint stays);
    ``skip`` (the step skipped the update) says how many batches were skipped."""

    every_process = True  # every process must stop a diverged ticket alike

    def __init__(self, policy: str):
        self.policy = policy

    def epoch_trained(self, run, r, epoch, metrics):
        finite = np.asarray(metrics["finite"]).astype(bool)
        for k, t in enumerate(run.tickets):
            if t.failed is not None or finite[k].all():
                continue
            first = int(np.argmin(finite[k]))
            where = f"round {r}, epoch {epoch}, step {first + 1} of the epoch"
            if self.policy == "stop":
                run.fail(k, TrainingDiverged(
                    f"the loss became {np.asarray(metrics['loss'])[k, first]} at {where}; the "
                    f"last good checkpoint is kept. Lower --lr, cap the penalty with "
                    f"--reg_upper_limit, or pass --nan_policy skip"))
            else:
                run.log(_prefix(run, k) + f"skipped {int((~finite[k]).sum())} batches with a "
                        f"non-finite loss (first at {where})")


class Checkpointer(Callback):
    """Orbax checkpoints: after every epoch the resume checkpoint (newest two kept) and,
    at a new best validation accuracy, ``round_<r>/best``; each round's final ticket in
    ``round_<r>/final``; after the next round is planned, the resume checkpoint again.
    An epoch's checkpoints are written as one group (``checkpoint.writing``): a process
    told to stop lets the group finish, so it resumes after that epoch."""

    every_process = True  # orbax saves with every process of the run

    def __init__(self):
        self.saved = 0

    def epoch_end(self, run, r, epoch, rows):
        with ckpt.writing():
            self._epoch_end(run, r, epoch, rows)

    def _epoch_end(self, run, r, epoch, rows):
        for k, (t, row) in enumerate(zip(run.tickets, rows)):
            if row is None:
                continue
            state, plan = trees.ticket(run.states, k), trees.ticket(run.plan, k)
            if t.progress.best["epoch"] == epoch:  # a new best validation accuracy
                ckpt.save(t.paths.best(r), epoch, {"params": state.params,
                                                    "batch_stats": state.batch_stats,
                                                    "masks": plan.masks},
                          dict(run.ticket_meta(k), round=r, epoch=epoch, val_acc=row["val_acc"],
                               test_acc=row["test_acc"]))
            self._resume_point(run, k)

    def round_finished(self, run, r, rows):
        for k, (t, row) in enumerate(zip(run.tickets, rows)):
            if row is None:
                continue
            state, plan = trees.ticket(run.states, k), trees.ticket(run.plan, k)
            ckpt.save(t.paths.final(r), run.epochs,
                      {"params": state.params, "batch_stats": state.batch_stats,
                       "masks": plan.masks}, dict(run.ticket_meta(k), round=r, summary=row))

    def round_end(self, run, r, rows):
        with ckpt.writing():
            for k, row in enumerate(rows):
                if row is not None:
                    self._resume_point(run, k)

    def run_end(self, run):
        ckpt.close_managers()

    def _resume_point(self, run, k):
        t = run.tickets[k]
        ckpt.save(t.paths.checkpoints,
                  paths_lib.checkpoint_step(t.progress.round, t.progress.epoch, run.epochs),
                  run.checkpoint_tree(k), run.checkpoint_meta(k), keep=2)
        self.saved += 1
        stop_after = os.environ.get("RSST_JAX_STOP_AFTER")
        if stop_after and self.saved >= int(stop_after) * len(run.tickets):
            raise Interrupted(75)


class SummaryWriter(Callback):
    """summary.json and summary.csv (one row per round, written atomically) and the
    round's line on the screen, with the method's warnings after it (RSST: penalized
    weights that kept more of their norm than ``regularizers.PENALTY_BUDGET``)."""

    def round_end(self, run, r, rows):
        for k, (t, row) in enumerate(zip(run.tickets, rows)):
            if row is None:
                continue
            write_summary(t.paths, t.progress.rows, run.method)
            run.log(_prefix(run, k) + round_line(row, run.method))
            for line in run.method.round_warnings(row):
                run.log(_prefix(run, k) + line)


def write_summary(paths: paths_lib.RunPaths, rows: list[dict], method=None) -> None:
    """summary.json (every key of the rows) and summary.csv (the declared round metrics of
    the core and of ``method``; of every registered method where None)."""
    atomic_write(paths.summary_json, json.dumps(rows, indent=1))
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=summary_fields(None if method is None else [method]),
                       extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow(row)
    atomic_write(paths.summary_csv, text.getvalue())


class RunLocks(Callback):
    """``run.lock`` in every ticket's directory for the whole run: a second run on the
    same --save_dir refuses to start; a run that dies leaves nothing stuck."""

    def __init__(self, dirs, log=None):
        self.locks = [runlock.RunLock(d, log=log) for d in dirs]

    def acquire(self) -> "RunLocks":
        taken = []
        try:
            for lock in self.locks:
                taken.append(lock.acquire())
        except BaseException:
            for lock in taken:
                lock.release()
            raise
        return self

    def run_end(self, run):
        for lock in self.locks:
            lock.release()


class NextSteps(Callback):
    """At the end: where the results are and the commands that read them."""

    def run_finished(self, run):
        dirs = [str(t.paths.root) for t in run.tickets]
        where = dirs[0] if len(dirs) == 1 else str(run.tickets[0].paths.root.parent)
        run.log(f"done: {', '.join(str(t.paths.summary_json) for t in run.tickets)}")
        imports = config_lib.plugin_modules(run.tickets[0].cfg)
        run.log("next: " + "  |  ".join((
            paths_lib.command("experiments.compare", dirs, imports),
            paths_lib.command("experiments.plot", [where], imports),
            paths_lib.command("experiments.analyze", [dirs[0]], imports))))


def default_callbacks(cfg, *, progress: bool = True) -> list[Callback]:
    """What ``python -m experiments.run`` does (the run lock is taken by the driver)."""
    # The summary before the checkpoint: a run killed between the two redoes the round's end.
    extra = [Wandb(cfg.run.wandb)] if cfg.run.wandb else []
    return [NanGuard(cfg.run.nan_policy), ProgressBar(progress), EpochLog(), TensorBoard(),
            *extra, SummaryWriter(), Checkpointer(), NextSteps()]


__all__ = ["Callback", "ProgressBar", "EpochLog", "NanGuard", "Checkpointer", "SummaryWriter",
           "RunLocks", "NextSteps",
           "TrainingDiverged", "Interrupted", "summary_fields", "epoch_line",
           "round_line", "write_summary", "atomic_write", "default_callbacks"]
