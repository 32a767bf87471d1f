"""What a run records, declared once: every key of ``log.jsonl`` (per epoch) and of the
summary rows (per round), with its label, whether ``experiments.plot`` draws it and its
part of the line a run prints.

The core's keys are declared here (:data:`EPOCH`, :data:`ROUND`); a method declares its
own in ``Method.metrics`` (``rsst_jax.methods``). ``log.jsonl``, ``summary.csv``,
TensorBoard, W&B, plot, compare and analyze read these declarations, so a method's values
reach all of them without code of its own. Display is data: a :class:`Metric` with
defaults.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Sequence

EPOCH_ROW, ROUND_ROW = "epoch", "round"


@dataclasses.dataclass(frozen=True)
class Metric:
    """One recorded value.

    ``key``: its key in the rows (log.jsonl for ``per="epoch"``, summary.json and
    summary.csv for ``per="round"``). ``label``: how tables, plots and analyze name it.
    ``plot``: ``experiments.plot`` draws it (an epoch metric of a method: one panel of
    ``method.png``, one line per round). ``line``: its part of the epoch's or round's
    line on the screen, a format string over the row's keys (``"lambda {reg_lambda:.3g}"``),
    shown where the row holds the key (not None); "" (the default): not shown.
    ``log_scale``: its panel uses a log scale where the values span more than 100x."""
    key: str
    label: str
    per: str = EPOCH_ROW
    plot: bool = True
    line: str = ""
    log_scale: bool = False

    def __post_init__(self):
        if self.per not in (EPOCH_ROW, ROUND_ROW):
            raise ValueError(f"Metric {self.key!r}: per must be 'epoch' or 'round', "
                             f"got {self.per!r}")

    def text(self, row: dict) -> str:
        """Its part of the screen line for ``row``, or "" (absent, None, or no line)."""
        if not self.line or row.get(self.key) is None:
            return ""
        return self.line.format(**row)


# The core's keys. Every run's epoch rows and summary rows hold these (the before/after
# pair only for rounds that end by removing channels, bn_* only with --bn_recalibrate).
EPOCH = (
    Metric("train_loss", "train loss"),
    Metric("train_acc", "train accuracy (%)"),
    Metric("val_acc", "validation accuracy (%)"),
    Metric("test_acc", "test accuracy (%)"),
    Metric("val_loss", "validation loss", plot=False),
    Metric("test_loss", "test loss", plot=False),
    Metric("lr", "learning rate", plot=False),
    Metric("time_s", "epoch time (s)", plot=False),
    Metric("bn_time_s", "BatchNorm re-estimation time (s)", plot=False),
)
ROUND = (
    Metric("remaining_weight_pct", "remaining weights (%)", per=ROUND_ROW),
    Metric("channel_sparsity_pct", "channel sparsity (%)", per=ROUND_ROW),
    Metric("best_val_acc", "best validation accuracy (%)", per=ROUND_ROW),
    Metric("best_val_epoch", "epoch of the best validation accuracy", per=ROUND_ROW,
           plot=False),
    Metric("test_acc_at_best_val", "test accuracy at the best validation epoch (%)",
           per=ROUND_ROW),
    Metric("final_val_acc", "final validation accuracy (%)", per=ROUND_ROW),
    Metric("final_test_acc", "final test accuracy (%)", per=ROUND_ROW),
    Metric("acc_before_s", "test accuracy before removing channels (%)", per=ROUND_ROW,
           line="before/after S {acc_before_s:.2f}/{acc_after_s:.2f}%"),
    Metric("acc_after_s", "after (%)", per=ROUND_ROW),
    Metric("bn_recalibrate", "BatchNorm statistics re-estimated over (batches)",
           per=ROUND_ROW, plot=False,
           line="BatchNorm statistics from {bn_recalibrate} batches"),
    Metric("devices", "devices the tickets trained on", per=ROUND_ROW, plot=False),
)
TIMES = (
    Metric("epochs", "epochs", per=ROUND_ROW, plot=False),
    Metric("round_time_s", "round time (s)", per=ROUND_ROW, plot=False),
    Metric("wall_time_s", "wall time (s)", per=ROUND_ROW, plot=False),
)

# Keys earlier versions wrote (RSST's names for the accuracy around removing channels),
# read as today's.
LEGACY_KEYS = {"rsst_acc_before": "acc_before_s", "rsst_acc_after": "acc_after_s"}


def renamed(row: dict) -> dict:
    """``row`` with keys of earlier versions (:data:`LEGACY_KEYS`) under today's names."""
    if not any(k in row for k in LEGACY_KEYS):
        return row
    return {LEGACY_KEYS.get(k, k): v for k, v in row.items()}


def _unique(metrics: Iterable[Metric]) -> tuple[Metric, ...]:
    out: dict[str, Metric] = {}
    for m in metrics:
        out.setdefault(m.key, m)
    return tuple(out.values())


def of_method(method, per: str) -> tuple[Metric, ...]:
    """The metrics ``method`` declares for ``per`` (epoch or round rows); none for None."""
    return tuple(m for m in getattr(method, "metrics", ()) if m.per == per)


def declared(per: str, methods: Optional[Sequence] = None) -> tuple[Metric, ...]:
    """The core's metrics of ``per`` rows, then those of ``methods`` (default: every
    registered method), without repeats: what summary.csv's columns and analyze's labels
    are made of."""
    if methods is None:
        from rsst_jax.methods.registry import registered  # cycle: rsst_jax.methods imports this one
        methods = registered()
    core = EPOCH if per == EPOCH_ROW else ROUND
    extra = [m for method in methods for m in of_method(method, per)]
    return _unique([*core, *extra, *(TIMES if per == ROUND_ROW else ())])


def labels(per: str, methods: Optional[Sequence] = None) -> dict[str, str]:
    """key -> label of the declared metrics of ``per`` rows."""
    return {m.key: m.label for m in declared(per, methods)}


def line_parts(row: dict, metrics: Sequence[Metric]) -> str:
    """The parts ``metrics`` add to a screen line for ``row``: each shown part after ", ",
    or after a space where it opens with "(" (a remark on the part before it)."""
    text = ""
    for m in metrics:
        part = m.text(row)
        if part:
            text += (" " if part.startswith("(") else ", ") + part
    return text


__all__ = ["Metric", "EPOCH", "ROUND", "TIMES", "EPOCH_ROW", "ROUND_ROW", "LEGACY_KEYS",
           "renamed", "of_method", "declared", "labels", "line_parts"]
