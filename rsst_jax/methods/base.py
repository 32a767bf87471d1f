"""What a pruning method is: :class:`Method`, the protocol IMP, Refill, RSST and yours
implement (docs/methods.md).

A method is one object, registered under the name ``--struct`` takes
(``register_method``). The driver, the engine, the run readers, compare, plot, bench
and sweep ask it; nothing outside a method's module tests which method runs. Every hook
has a default that does nothing special, so a method overrides only what it changes:

- **settings**: ``settings = (group name, frozen dataclass)`` of its own flags, each
  declared with ``rsst_jax.config.flag`` (they join the command line, config.json,
  validation and the README's table); :meth:`check` validates them.
- **planning the next round** from the trained weights: :meth:`next_masks` returns the
  kernel masks M and, for a round that ends by applying them, channel masks S;
  :meth:`make_plan` builds the round's plan, with the penalty targets of
  :meth:`targets`.
- **the train step**: :meth:`transform`, an optax transformation placed first in the
  optimizer chain (before weight decay and the masks), called with the extra arguments
  ``reg_targets`` (the plan's targets) and ``reg_lambda`` (lambda at this step, from
  :meth:`hyper` and :meth:`penalty_schedule`), or nothing.
- **the run**: :meth:`startup_lines`, :meth:`round_start`, :meth:`epoch_scale`,
  :meth:`epoch_fields`, :meth:`finish_round` (RSST applies S there and records the
  accuracy before and after), :meth:`round_text`, :meth:`round_warnings`,
  :meth:`bar_fields`; the keys it adds to the epoch log (``epoch_fields``), the summary
  rows (``summary_fields``) and the round scalars (``round_scalars``).
- **reading runs**: :meth:`label` and :meth:`describe` (compare's table), ``markers``
  (compare's picture) and ``final_masks_differ`` (channels.png's second panel).
"""
from __future__ import annotations

from typing import Any, Optional

from rsst_jax import rounds
from rsst_jax import train as train_lib

PyTree = Any


class Method:
    """A pruning method; subclass it, set ``name``, override what differs, register it."""

    name: str = ""                 # the value of --struct
    title: str = ""                # its name in tables (compare, analyze)
    summary: str = ""              # one line for docs and --help
    channels: bool = False         # keeps whole channels: --mask_bn on by default, ranks
    #                                channels with --criteria, refuses --prune_method filter
    settings: Optional[tuple[str, type]] = None   # (group, dataclass) of its own flags
    epoch_fields: tuple = ()       # keys it adds to an epoch's log row (also plotted)
    summary_fields: tuple = ()     # keys it adds to a round's summary row (summary.csv)
    round_scalars: tuple = ()      # of those, the ones TensorBoard and W&B draw
    final_masks_differ: bool = False  # the final ticket's masks differ from M trained with
    markers: dict = {}             # compare's plot marker per label (default "o")
    field_labels: dict = {}        # summary key -> how analyze names it

    # ---------------------------------------------------------------- configuration
    def check(self, cfg, need, *, chosen: bool) -> None:
        """Validate this method's flags: ``need(condition, message)`` raises the message.
        Called for every registered method; ``chosen``: it is the run's method."""

    def label(self, config: dict) -> str:
        """The method's name in compare's table for a run's ``config.json``."""
        return self.title or self.name

    def describe(self, config: dict) -> dict:
        """compare's ``criteria`` and ``schedule`` columns for a run of this method."""
        crit = str(config.get("criteria", "?")) if self.channels else "-"
        return {"criteria": crit, "schedule": "-"}

    # ---------------------------------------------------------------- the train step
    def transform(self, cfg):
        """An optax ``GradientTransformationExtraArgs`` that acts on the gradient before
        weight decay and the masks (reads ``reg_targets``, ``reg_lambda``), or None:
        nothing (``train.make_optimizer`` keeps an inert penalty in its place)."""
        return None

    def hyper(self, cfg) -> train_lib.Hyper:
        """A ticket's traced schedule values: its learning rate and lambda schedule."""
        return train_lib.Hyper.make(cfg.optim.lr)

    def penalty_schedule(self, cfg) -> dict:
        """Static settings of the lambda schedule (``train.Schedules`` keywords)."""
        return {}

    # ---------------------------------------------------------------- planning
    def next_masks(self, net, variables, masks, prune_cfg, round_idx: int, *, key,
                   score_batches, mean, std) -> tuple[PyTree, Optional[PyTree]]:
        """After round ``round_idx``: the next round's kernel masks M and channel masks S
        (None unless the round ends by applying them). ``score_batches()`` gives the
        criterion's (batches, key), to be called only when channel scores are needed."""
        raise NotImplementedError(f"method {self.name!r} does not define next_masks")

    def example_masks(self, weight_masks, channel_masks) -> tuple[PyTree, Optional[PyTree]]:
        """(M, S) of a typical round of this method, from a weight mask and a channel mask
        (what ``experiments.bench`` times): the weight mask, or the channel mask where the
        method keeps whole channels."""
        return (channel_masks if self.channels else weight_masks), None

    def targets(self, net, params_like, prune_cfg, alive, channel_masks) -> Optional[PyTree]:
        """What the penalty of a round acts on: a bool tree with the structure of
        ``alive``, the round's training masks (M and, with --mask_bn, the BatchNorm of its
        live channels; ``rounds.train_masks``), given S = ``channel_masks``; or None:
        nothing."""
        return None

    def make_plan(self, net, params_like, prune_cfg, masks, channel_masks=None, *,
                  hyper: train_lib.Hyper, reg_scale: float = 1.0, teacher=None,
                  kd_alpha: float = 0.0) -> rounds.RoundPlan:
        """The plan of a round trained with M = ``masks`` (and S = ``channel_masks``)."""
        return rounds.plan_round(
            net, params_like, prune_cfg, masks, channel_masks,
            targets_of=lambda alive: self.targets(net, params_like, prune_cfg, alive,
                                                  channel_masks),
            hyper=hyper, reg_scale=reg_scale, teacher=teacher, kd_alpha=kd_alpha)

    # ---------------------------------------------------------------- the run
    def startup_lines(self, cfg, schedules) -> tuple[Optional[float], list[str]]:
        """(a prediction the round lines compare with, lines to print before training)."""
        return None, []

    def round_start(self, run, k: int) -> None:
        """Round start of ticket k (``run`` is the driver's ``RunState``)."""

    def epoch_scale(self, cfg, progress) -> float:
        """The multiplier of lambda for ticket ``cfg``'s next epoch."""
        return 1.0

    def epoch_fields_of(self, run, k: int, metrics, scale: float) -> dict:
        """Values this method adds to ticket k's epoch row (``metrics``: [K, steps])."""
        return {}

    def finish_round(self, run, rows: list) -> None:
        """At a round's end, before the rows get the final masks' densities: change the
        tickets (``run.states``, ``run.plan``) and add to the summary ``rows``."""

    def round_text(self, row: dict) -> str:
        """What this method adds to a round's line on the screen."""
        return ""

    def round_warnings(self, row: dict) -> list[str]:
        """Warnings printed after a round's line."""
        return []

    def bar_fields(self, run, metrics) -> dict:
        """What the progress bar shows besides loss and accuracy."""
        return {}

    def zero_weights_reason(self, summary_row: dict) -> Optional[str]:
        """Why a round's final ticket (its ``summary_row``) keeps weights that are exactly
        zero, for ``experiments.analyze``; None: no reason of this method's."""
        return None

    def dry_run_note(self, cfg) -> Optional[str]:
        """A line of ``--dry_run``'s plan about this method, or None."""
        if self.channels and cfg.prune.pruning_times > 1:
            return (f"({cfg.prune.struct}: whole channels are kept per layer, so rounds after "
                    f"0 keep about these densities, channel-wise)")
        return None


__all__ = ["Method"]
