"""Watching runs: TensorBoard event files (written by tensorboardX) and Weights & Biases.

Both get the same scalars, on one step axis: the epochs trained so far, counted over the
whole run (epoch e of round r, from 1, is step ``r * epochs + e``).

- ``epoch/<key>``: every number of the epoch's row of ``log.jsonl`` (int or float, not
  bool: losses, accuracies, lr, the method's own columns such as RSST's ``reg_lambda``,
  ``reg_scale``, ``target_count``), at the epoch's step;
- ``round/<key>``: every number of the round's row of ``summary.json``, and
  ``density/<layer>``, each prunable layer's fraction of weights kept by the round's
  ticket, at the step of the round's last epoch, ``(r + 1) * epochs``.

Nothing here names a column: a method that adds one to its rows is drawn as it is. The
declarations (``rsst_jax.metrics``: the core's and the run's method's) give each tag its
description in TensorBoard (the label, under the chart's information icon,
:func:`descriptions`); a number nobody declared is written all the same, without one.

A resumed run redoes what came after its checkpoint. Every run's TensorBoard writer opens
a new event file that starts with ``purge_step`` (a ``SessionLog.START`` event at the
first step it writes): TensorBoard drops every earlier event of the directory at that
step or later, and the run writes them again, so an epoch redone after a resume appears
once. (TensorBoard's readers take the first START of a directory as its start, not as
a restart, hence one in every file, a fresh run's too.) W&B continues the same W&B run (its id
is kept in ``wandb/run_id``); W&B keeps the first value logged at a step.
"""
from __future__ import annotations

import numbers
import pathlib
import secrets

import numpy as np

from rsst_jax import masks as masks_lib
from rsst_jax import metrics as metrics_lib
from rsst_jax import trees

EVENT_PREFIX = "events.out.tfevents."


def row_numbers(row: dict) -> dict:
    """The numeric values of a row (int or float, not bool), by key."""
    return {k: v for k, v in row.items()
            if isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))}


def epoch_step(r: int, epoch: int, epochs: int) -> int:
    return r * epochs + epoch


def round_step(r: int, epochs: int) -> int:
    """The step of a round's scalars: that of its last epoch."""
    return (r + 1) * epochs


def epoch_scalars_of(row: dict) -> dict:
    return {f"epoch/{k}": v for k, v in row_numbers(row).items()}


def round_scalars_of(row: dict, densities: dict) -> dict:
    values = {f"round/{k}": v for k, v in row_numbers(row).items()}
    values.update({f"density/{layer}": d for layer, d in densities.items()})
    return values


DENSITY_LABEL = "fraction of the layer's weights the round's ticket keeps"


def descriptions(method=None) -> dict:
    """tag -> description of every declared metric (the core's and ``method``'s): its
    label, with whether it is per epoch or per round; ``density/`` tags share one
    (:data:`DENSITY_LABEL`, looked up by prefix)."""
    out = {}
    for per, prefix in ((metrics_lib.EPOCH_ROW, "epoch/"), (metrics_lib.ROUND_ROW, "round/")):
        for m in metrics_lib.declared(per, [] if method is None else [method]):
            out[prefix + m.key] = f"{m.label} (per {per})"
    return out


def description(tag: str, known: dict) -> str:
    """``tag``'s description from :func:`descriptions`, "" for an undeclared number."""
    if tag.startswith("density/"):
        return DENSITY_LABEL
    return known.get(tag, "")


def first_step(progress, epochs: int) -> int:
    """The first step a run resumed at ``progress`` writes: the next epoch's, or, every
    epoch of its round done but not the round's end, the round's (its last epoch's)."""
    if progress.epoch < epochs:
        return epoch_step(progress.round, progress.epoch + 1, epochs)
    return round_step(progress.round, epochs)


class _Scalars:
    """What TensorBoard and W&B share: the scalars of each epoch and round, handed to
    ``write(ticket, step, values)``. A round's densities are taken when its final ticket
    is known (``round_finished``); its scalars go out with its complete summary row
    (``round_end``, which also has the round's times).

    A callback of the driver (``rsst_jax.callbacks.Callback``'s events; that module
    imports this one, so the events it does not use are spelled out here as nothing to
    do; tests/test_monitoring.py checks that none is missing)."""

    every_process = False  # process 0 alone writes a run's files

    def __init__(self):
        self.densities: dict = {}

    def run_start(self, run): pass
    def epoch_start(self, run, r, epoch, steps): pass
    def chunk(self, run, done, total, metrics): pass
    def epoch_trained(self, run, r, epoch, metrics): pass
    def run_finished(self, run): pass
    def run_end(self, run): pass

    def write(self, t, step: int, values: dict) -> None:
        raise NotImplementedError

    def epoch_end(self, run, r, epoch, rows):
        for t, row in zip(run.tickets, rows):
            if row is not None:
                self.write(t, epoch_step(r, epoch, run.epochs), epoch_scalars_of(row))

    def round_finished(self, run, r, rows):
        for k, (t, row) in enumerate(zip(run.tickets, rows)):
            if row is not None:
                self.densities[t.paths.root] = {
                    layer.path: layer.density
                    for layer in masks_lib.report(trees.ticket(run.plan.masks, k))}

    def round_end(self, run, r, rows):
        for t, row in zip(run.tickets, rows):
            if row is not None:
                self.write(t, round_step(r, run.epochs),
                           round_scalars_of(row, self.densities.pop(t.paths.root, {})))


def event_files(logdir) -> list[pathlib.Path]:
    """The TensorBoard event files directly in ``logdir``, in the order TensorBoard reads
    them (by name)."""
    logdir = pathlib.Path(logdir)
    if not logdir.is_dir():
        return []
    return sorted(p for p in logdir.iterdir() if p.name.startswith(EVENT_PREFIX) and p.is_file())


class TensorBoard(_Scalars):
    """TensorBoard event files in every ticket's run directory (``tensorboard --logdir``),
    through tensorboardX; flushed at the end of each epoch and round.

    Each run (fresh, resumed, or restarted after a kill before its first checkpoint)
    writes a new file starting with ``purge_step`` = ``first_step`` of its progress,
    and writes again the epochs of its history at that step or later (the last epoch
    of a round whose end is redone)."""

    def __init__(self):
        super().__init__()
        self.writers: dict = {}
        self.known: dict = {}

    def run_start(self, run):
        from tensorboardX import SummaryWriter  # start-up: it imports torch where installed
        self.known = descriptions(run.method)
        for t in run.live_tickets():
            root = t.paths.root
            purge = first_step(t.progress, run.epochs)
            # tensorboardX names a file after the second it opens it; the number keeps a
            # resumed run's file after (and apart from) the earlier ones of that second.
            w = SummaryWriter(str(root), purge_step=purge, flush_secs=3600,
                              filename_suffix=f".{len(event_files(root)):04d}")
            self.writers[root] = w
            for row in t.progress.history:
                step = epoch_step(row["round"], row["epoch"], run.epochs)
                if step >= purge:
                    self._add(w, step, epoch_scalars_of(row))
            w.flush()

    def _add(self, w, step: int, values: dict) -> None:
        for tag, v in values.items():
            w.add_scalar(tag, float(v), step,
                         summary_description=description(tag, self.known))

    def write(self, t, step, values):
        w = self.writers.get(t.paths.root)
        if w is not None:
            self._add(w, step, values)
            w.flush()

    def run_end(self, run):
        for w in self.writers.values():
            w.close()
        self.writers = {}


class Wandb(_Scalars):
    """``--wandb [ENTITY/]PROJECT``: the scalars of :class:`TensorBoard` sent to Weights &
    Biases, one W&B run per ticket: name the run directory's name, group its parent's (a
    sweep's --out, a --num_seeds SAVE_DIR), config the run's flags. The W&B run id is
    kept in ``wandb/run_id`` of the run directory, so a resumed run continues the same
    W&B run. Needs ``pip install -e ".[wandb]"``; ``WANDB_MODE=offline`` writes under the
    run directory only."""

    def __init__(self, target: str):
        super().__init__()
        entity, _, project = target.rpartition("/")
        self.entity, self.project = entity or None, project
        self.runs: dict = {}

    def run_start(self, run):
        import wandb  # start-up: optional (rsst-jax[wandb]), 0.3 s; --wandb only
        for t in run.live_tickets():
            root = t.paths.root.resolve()
            (root / "wandb").mkdir(parents=True, exist_ok=True)
            id_file = root / "wandb" / "run_id"
            run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
            try:
                self.runs[t.paths.root] = wandb.init(
                    project=self.project, entity=self.entity, group=root.parent.name,
                    name=root.name, id=run_id, resume="allow", dir=str(root),
                    config=t.cfg.to_dict(), reinit="create_new")
            except Exception as e:  # noqa: BLE001  no account, no network: train anyway
                run.log(f"note: W&B is not logging {root.name} ({e.__class__.__name__}: "
                        f"{e}); the run goes on (WANDB_MODE=offline logs locally)")

    def write(self, t, step, values):
        w = self.runs.get(t.paths.root)
        if w is not None:
            w.log(values, step=step)

    def run_end(self, run):
        for w in self.runs.values():
            w.finish()
        self.runs = {}


__all__ = ["TensorBoard", "Wandb", "row_numbers", "epoch_step", "round_step",
           "epoch_scalars_of", "round_scalars_of", "first_step", "event_files", "descriptions",
           "description", "DENSITY_LABEL"]
