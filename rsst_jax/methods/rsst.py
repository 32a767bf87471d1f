"""RSST, regularized structured sparse training (``--struct rsst``; docs/SPEC.md section 2).

After each round RSST chooses the next round's kernel masks M as IMP does and channel
masks S as Refill does, but trains with M: a penalty ``lambda(t) * w`` pushes the
weights M keeps and S removes (and, with --mask_bn, the BatchNorm of those channels)
towards zero while the round trains, lambda growing by ``--RST_schedule``. At the
round's end the driver applies S; the summary row records the test accuracy before and
after. Its flags are the ``rsst`` group below (``cfg.rsst``); the penalty, its schedules
and its budget maths are ``rsst_jax.regularizers``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

from rsst_jax import config as config_lib
from rsst_jax import regularizers, trees
from rsst_jax.config import flag
from rsst_jax.methods.base import Penalty
from rsst_jax.methods.refill import Refill, refilled
from rsst_jax.methods.registry import register_method
from rsst_jax.metrics import ROUND_ROW, Metric


@dataclasses.dataclass(frozen=True)
class RSSTConfig:
    block_loss_grad: bool = flag(False, "drop the loss gradient of penalized weights",
                                 method_only=True)
    RST_schedule: str = flag("exp_custom_exponents", "penalty schedule lambda(t)",
                             groupable=True, choices="rsst_jax.regularizers:SCHEDULES")
    reg_granularity_prune: float = flag(1.0, "penalty scale g", groupable=True, finite=True)
    exponents: float = flag(4.0, "exponent of exp_custom_exponents", groupable=True,
                            finite=True)
    reg_upper_limit: Optional[float] = flag(None, "(new) cap on lambda", groupable=True)
    update_reg_interval: Optional[int] = flag(
        None, "(new) steps between penalty updates for the x, x^k and exp schedules (one "
        "epoch when not given)")
    reg_progress: str = flag("round", "(new) progress p runs over the round, or restarts "
                             "every epoch as in the reference",
                             choices="rsst_jax.regularizers:PROGRESS")
    reg_adaptive: bool = flag(False, "(new) halve lambda while validation accuracy < "
                              "--target_acc", method_only=True)
    target_acc: Optional[float] = flag(None, "(new) target validation accuracy (%) for "
                                       "--reg_adaptive", finite=True)


config_lib.register_group("rsst", RSSTConfig)


def penalty_values(cfg) -> dict:
    """The ticket's traced lambda-schedule settings (``regularizers.lambda_at``'s)."""
    s = cfg.rsst
    return {"kind": jnp.int32(regularizers.SCHEDULES.index(s.RST_schedule)),
            "g": jnp.float32(s.reg_granularity_prune), "exponents": jnp.float32(s.exponents),
            "upper": jnp.float32(jnp.inf if s.reg_upper_limit is None else s.reg_upper_limit)}


def lambda_schedule(cfg):
    """``schedule(step, values, steps)``: lambda of ``--RST_schedule`` at ``step``; the
    update interval and the progress mode (not groupable) are closed over."""
    interval, progress = cfg.rsst.update_reg_interval, cfg.rsst.reg_progress

    def schedule(step, values, steps):
        return regularizers.lambda_at(
            step, kind=values["kind"], granularity=values["g"], exponents=values["exponents"],
            upper_limit=values["upper"], total_steps=steps.total_steps,
            update_interval=interval or steps.steps_per_epoch, progress=progress,
            steps_per_epoch=steps.steps_per_epoch)
    return schedule


@register_method
class RSST(Refill):
    name = "rsst"
    title = "RSST"
    summary = ("Refill's channels reached by a growing penalty on the weights they remove, "
               "applied at the round's end")
    paper = ("regularized structured sparse training, the PyTorch research code this "
             "project reimplements (docs/SPEC.md)")
    settings = ("rsst", RSSTConfig)
    metrics = (
        Metric("reg_lambda", "lambda (penalty coefficient)", line="lambda {reg_lambda:.3g}",
               log_scale=True),
        Metric("target_norm_rel", "penalized weights' L2 norm / norm at round start"),
        Metric("target_small_frac", "fraction of penalized weights with |w| < 1e-3"),
        Metric("reg_scale", "multiplier of lambda (--reg_adaptive)", plot=False),
        Metric("target_count", "penalized weights", plot=False),
        Metric("final_lambda", "lambda at the round's end", per=ROUND_ROW, plot=False),
        Metric("target_norm_rel", "penalized weights' norm kept at the round's end",
               per=ROUND_ROW, plot=False,
               line="penalized weights keep {target_norm_rel:.1%} of their norm"),
        Metric("predicted_norm_rel", "norm kept, predicted before training", per=ROUND_ROW,
               plot=False, line="(predicted {predicted_norm_rel:.1%})"),
    )
    markers = {"RSST": "^"}

    def check(self, cfg, need):
        s = cfg.rsst
        need(s.reg_granularity_prune >= 0, "--reg_granularity_prune must be >= 0")
        need(s.reg_upper_limit is None or s.reg_upper_limit > 0, "--reg_upper_limit must be > 0")
        need(s.update_reg_interval is None or s.update_reg_interval >= 1,
             "--update_reg_interval must be >= 1 step")
        if s.reg_adaptive:
            need(s.target_acc is not None,
                 "--reg_adaptive needs --target_acc (validation accuracy in %)")
        need(s.target_acc is None or 0 <= s.target_acc <= 100,
             "--target_acc is a percentage in [0, 100]")
        need(s.exponents > 0, f"--exponents must be > 0, got {s.exponents}")

    def describe(self, config: dict) -> dict:
        text = str(config.get("RST_schedule", "?"))
        if text == "exp_custom_exponents":
            text += f"={config['exponents']:g}" if "exponents" in config else ""
        if config.get("reg_adaptive"):
            text += " adaptive"
        return dict(super().describe(config), schedule=text)

    def penalty(self, cfg):
        return Penalty(regularizers.rsst_penalty(block_loss_grad=cfg.rsst.block_loss_grad),
                       schedule=lambda_schedule(cfg), values=penalty_values(cfg))

    def next_masks(self, ticket, scoring):
        return refilled(ticket, scoring)

    def targets(self, cfg, net, alive, alive_s):
        """The weights M keeps and S removes; with --mask_bn also the BatchNorm scale and
        bias of the channels S removes, because BatchNorm undoes any shrinking of a conv
        channel's weights until they reach zero."""
        if alive_s is None:
            return None
        return trees.map_masks(lambda m, s: jnp.logical_and(m, jnp.logical_not(s)),
                               alive, alive_s)

    def start(self, cfg, schedules):
        if cfg.optim.optimizer != "sgd" or cfg.prune.pruning_times < 2:
            return {}, []
        frac, lines = regularizers.penalty_check(cfg, schedules, lambda_schedule(cfg),
                                                 penalty_values(cfg))
        return {"predicted_norm_rel": frac}, lines

    def round_start(self, ticket):
        norm0 = None
        if ticket.channel_masks is not None:
            norm0 = regularizers.target_stats(ticket.params, ticket.targets)[0]
        return dict(ticket.info, target_norm0=norm0)

    def epoch_scale(self, ticket):
        if not ticket.cfg.rsst.reg_adaptive:
            return 1.0
        last = ticket.history[-1]["val_acc"] if ticket.history else None
        return regularizers.adaptive_scale(last, ticket.cfg.rsst.target_acc)

    def epoch_values(self, ticket, metrics):
        if ticket.channel_masks is None:
            return {}
        norm, small, count = regularizers.target_stats(ticket.params, ticket.targets)
        norm0 = ticket.info.get("target_norm0")
        return dict(reg_lambda=float(metrics["reg_lambda"][-1]),
                    reg_scale=self.epoch_scale(ticket), target_count=count,
                    target_small_frac=small, target_norm_rel=norm / norm0 if norm0 else 0.0)

    def round_values(self, ticket, row):
        if "acc_after_s" not in row or not ticket.history:
            return {}
        last = ticket.history[-1]
        return dict(final_lambda=last.get("reg_lambda"),
                    target_norm_rel=last.get("target_norm_rel"),
                    predicted_norm_rel=ticket.info.get("predicted_norm_rel"))

    def round_warnings(self, row):
        kept, budget = row.get("target_norm_rel"), regularizers.PENALTY_BUDGET
        if kept is None or kept <= budget or "acc_after_s" not in row:
            return []
        cost = row["acc_before_s"] - row["acc_after_s"]
        return [f"warning: round {row['round']}'s penalized weights kept {100 * kept:.1f}% of "
                f"their norm (above {100 * budget:.0f}%; the loss gradient holds them against "
                f"the penalty), and removing them cost {cost:.2f} points; a larger "
                f"--reg_granularity_prune (or --block_loss_grad) shrinks them further"]


__all__ = ["RSST", "RSSTConfig", "lambda_schedule", "penalty_values"]
