"""What a pruning method is: :class:`Method`, the protocol every method implements
(docs/methods.md documents each member).

A method is one object, registered under the name ``--struct`` takes
(``register_method``). Its hooks receive plain values of one ticket (its configuration,
weights, masks, metrics and the method's own state: :class:`TicketValues`) and return
values; none receives the driver, whose loop (``rsst_jax.driver``) does everything else
for every method alike: it trains, evaluates, checkpoints, rewinds, and ends a round by
applying the channel masks S where the method chose them (accuracy before and after,
BatchNorm re-estimation). Every hook has a default, so a method overrides only what it
changes. Its display is data: the :class:`~rsst_jax.metrics.Metric` declarations of
``metrics``.

A method's state, per ticket, has two parts, both saved in every checkpoint and
restored on resume:

- what the compiled step needs and changes: the state of its penalty's optax
  transformation (:class:`Penalty`), part of the optimizer state, restarted with the
  optimizer at each round's start (GReg's growing per-channel lambda lives there);
- what the host needs: ``info``, a JSON dict the driver keeps (RSST's norm of the
  penalized weights at the round's start), set by :meth:`Method.start` and
  :meth:`Method.round_start`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TicketValues:
    """One ticket as a method's hooks see it: values, nothing to change.

    ``cfg`` its configuration; ``net`` the network (``rounds.Network``: the model and
    one image's shape); ``round`` and ``epoch`` (epochs finished in the round);
    ``variables`` its weights (``{"params", "batch_stats"}``); ``masks`` the kernel
    masks M it trains with; ``channel_masks`` the channel masks S the round ends by
    applying (None where it does not); ``targets`` what its penalty acts on (None:
    nothing); ``penalty_state`` the state of the method's transformation (None without
    one); ``info`` the method's host state; ``history`` its epoch rows of every round
    so far (log.jsonl's rows)."""
    cfg: Any
    net: Any
    round: int
    epoch: int
    variables: dict
    masks: PyTree
    channel_masks: Optional[PyTree] = None
    targets: Optional[PyTree] = None
    penalty_state: Any = None
    info: dict = dataclasses.field(default_factory=dict)
    history: tuple = ()

    @property
    def params(self):
        return self.variables["params"]


@dataclasses.dataclass(frozen=True)
class Scoring:
    """What ranking channels may read after a round: ``batches()`` gives the criterion's
    (training batches of raw uint8 images and labels, key), to be called only when
    scores need them; ``key`` the ticket's random key; ``mean``/``std`` the data set's
    normalization."""
    batches: Callable[[], tuple]
    key: Any
    mean: Any
    std: Any


@dataclasses.dataclass(frozen=True)
class Penalty:
    """What a method adds to the train step.

    ``transform``: an optax ``GradientTransformationExtraArgs`` placed first in the
    optimizer chain (before weight decay and the masks). Its ``update`` receives the
    extra arguments ``reg_targets`` (the round's targets, :meth:`Method.targets`) and,
    with a ``schedule``, ``reg_lambda``; its state is the method's compiled state.
    ``schedule(step, values, steps)``: lambda at the round's optimizer step ``step``
    (traced int32) from ``values`` and ``steps`` (``train.Schedules``: steps per epoch
    and in the round), logged as the step metric ``reg_lambda``; None: no lambda.
    ``values``: this ticket's traced settings the schedule reads (a dict of scalars;
    tickets of one program may differ in them, so flags that go here may be declared
    groupable). The transform and schedule are built once per program, from its first
    ticket: what they close over must be a non-groupable flag."""
    transform: Any
    schedule: Optional[Callable] = None
    values: dict = dataclasses.field(default_factory=dict)


class Method:
    """A pruning method; subclass it, set ``name``, override what differs, register it."""

    # ------------------------------------------------------------------ what it is
    name: str = ""                 # the value of --struct
    title: str = ""                # its name in tables (compare, analyze)
    summary: str = ""              # one line for docs and --help
    paper: str = ""                # the paper it implements (docs/baselines.md)
    channels: bool = False         # keeps whole channels: --mask_bn on by default, ranks
    #                                channels with --criteria, refuses --prune_method filter
    settings: Optional[tuple[str, type]] = None   # (group, dataclass) of its own flags
    metrics: tuple = ()            # its rsst_jax.metrics.Metric declarations
    markers: dict = {}             # compare's plot marker per label (default "o")

    # ------------------------------------------------------------------ configuration
    def check(self, cfg, need) -> None:
        """Validate a configuration that runs this method: ``need(condition, message)``
        refuses it with the message. Called for the run's method only."""

    def label(self, config: dict) -> str:
        """The method's name in compare's table, from a run's ``config.json``."""
        return self.title or self.name

    def describe(self, config: dict) -> dict:
        """compare's ``criteria`` and ``schedule`` columns for a run of this method."""
        crit = str(config.get("criteria", "?")) if self.channels else "-"
        return {"criteria": crit, "schedule": "-"}

    # ------------------------------------------------------------------ a round's masks
    def next_masks(self, ticket: TicketValues, scoring: Scoring
                   ) -> tuple[PyTree, Optional[PyTree]]:
        """After round ``ticket.round``, from its trained weights: the next round's
        kernel masks M and channel masks S (None unless that round ends by applying
        them; the driver then removes the channels S drops at its end)."""
        raise NotImplementedError(f"method {self.name!r} does not define next_masks")

    def targets(self, cfg, net, alive: PyTree, alive_s: Optional[PyTree]) -> Optional[PyTree]:
        """What the penalty of a round acts on, given ``alive`` (the round's training
        masks: M and, with --mask_bn, the BatchNorm of its live channels) and ``alive_s``
        (the same of S, or None where the round does not end by applying S): a tree of
        arrays shaped like ``alive`` (None leaves where it is None) that the penalty's
        transformation reads as ``reg_targets`` (RSST: bool, the weights to push to zero;
        a group lasso: int32 group ids), the same kind in every round; None: nothing
        (an all-False bool tree)."""
        return None

    def penalty(self, cfg) -> Optional[Penalty]:
        """What the train step adds (:class:`Penalty`), or None: nothing."""
        return None

    # ------------------------------------------------------------------ the run
    def start(self, cfg, schedules) -> tuple[dict, list[str]]:
        """A ticket's initial ``info`` and the lines printed before training (and by
        ``--dry_run``); ``schedules`` are the round's step counts and learning rate
        (``train.Schedules``)."""
        return {}, []

    def round_start(self, ticket: TicketValues) -> dict:
        """``info`` for the round that starts (its weights rewound, its plan made)."""
        return ticket.info

    def epoch_scale(self, ticket: TicketValues) -> float:
        """The multiplier of lambda in the ticket's next epoch."""
        return 1.0

    def epoch_values(self, ticket: TicketValues, metrics: dict) -> dict:
        """Values added to the ticket's epoch row (log.jsonl), after the epoch trained;
        ``metrics``: its step metrics as numpy arrays [steps]."""
        return {}

    def round_values(self, ticket: TicketValues, row: dict) -> dict:
        """Values added to the ticket's summary row at the round's end (``row``: the
        row so far, after S was applied where the round applies it)."""
        return {}

    def round_warnings(self, row: dict) -> list[str]:
        """Lines printed after a round's line."""
        return []


__all__ = ["Method", "TicketValues", "Scoring", "Penalty"]
