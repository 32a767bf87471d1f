"""RSST, regularized structured sparse training (``--struct rsst``; docs/SPEC.md section 2).

After each round RSST chooses the next round's kernel masks M as IMP does and channel
masks S as Refill does, but trains with M: a penalty ``lambda(t) * w`` pushes the
weights M keeps and S removes (and, with --mask_bn, the BatchNorm of those channels)
towards zero while the round trains, lambda growing by ``--RST_schedule``. At the
round's end S is applied; the summary row records the test accuracy before and after.
Its flags are the ``rsst`` group below (``cfg.rsst``); the penalty and its budget maths
are ``rsst_jax.regularizers``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from rsst_jax import config as config_lib
from rsst_jax import regularizers, rounds, trees
from rsst_jax import train as train_lib
from rsst_jax.config import flag
from rsst_jax.methods.refill import Refill, refilled
from rsst_jax.methods.registry import register_method


@dataclasses.dataclass(frozen=True)
class RSSTConfig:
    block_loss_grad: bool = flag(False, "drop the loss gradient of penalized weights")
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
                              "--target_acc")
    target_acc: Optional[float] = flag(None, "(new) target validation accuracy (%) for "
                                       "--reg_adaptive", finite=True)


config_lib.register_group("rsst", RSSTConfig)


@register_method
class RSST(Refill):
    name = "rsst"
    title = "RSST"
    summary = ("Refill's channels reached by a growing penalty on the weights they remove, "
               "applied at the round's end")
    settings = ("rsst", RSSTConfig)
    epoch_fields = ("reg_lambda", "target_norm_rel")
    summary_fields = ("rsst_acc_before", "rsst_acc_after", "final_lambda")
    round_scalars = ("rsst_acc_before", "rsst_acc_after")
    final_masks_differ = True
    markers = {"RSST": "^"}
    field_labels = {"rsst_acc_before": "RSST before removing channels", "rsst_acc_after": "after"}

    def check(self, cfg, need, *, chosen):
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
        for flag_name, on in (("--block_loss_grad", s.block_loss_grad),
                              ("--reg_adaptive", s.reg_adaptive)):
            need(chosen or not on, f"{flag_name} acts on the RSST penalty; it needs "
                 f"--struct rsst (got --struct {cfg.prune.struct})")

    def describe(self, config: dict) -> dict:
        text = str(config.get("RST_schedule", "?"))
        if text == "exp_custom_exponents":
            text += f"={config['exponents']:g}" if "exponents" in config else ""
        if config.get("reg_adaptive"):
            text += " adaptive"
        return dict(super().describe(config), schedule=text)

    def transform(self, cfg):
        return regularizers.rsst_penalty(block_loss_grad=cfg.rsst.block_loss_grad)

    def hyper(self, cfg) -> train_lib.Hyper:
        s = cfg.rsst
        return train_lib.Hyper.make(cfg.optim.lr, s.RST_schedule, s.reg_granularity_prune,
                                    s.exponents, s.reg_upper_limit)

    def penalty_schedule(self, cfg) -> dict:
        return {"reg_interval": cfg.rsst.update_reg_interval,
                "reg_progress": cfg.rsst.reg_progress}

    def next_masks(self, net, variables, masks, prune_cfg, round_idx, *, key, score_batches,
                   mean, std):
        return refilled(net, variables, masks, prune_cfg, round_idx, key=key,
                        score_batches=score_batches, mean=mean, std=std)

    def example_masks(self, weight_masks, channel_masks):
        return weight_masks, channel_masks

    def targets(self, net, params_like, prune_cfg, alive, channel_masks):
        """The weights M keeps and S removes; with --mask_bn also the BatchNorm scale and
        bias of the channels S removes, because BatchNorm undoes any shrinking of a conv
        channel's weights until they reach zero."""
        if channel_masks is None:
            return None
        alive_s = rounds.train_masks(net, params_like, channel_masks, prune_cfg)
        return jax.tree_util.tree_map(
            lambda m, s: None if m is None else jnp.logical_and(m, jnp.logical_not(s)),
            alive, alive_s, is_leaf=trees.is_none)

    def startup_lines(self, cfg, schedules):
        if cfg.optim.optimizer != "sgd" or cfg.prune.pruning_times < 2:
            return None, []
        return regularizers.penalty_check(cfg, schedules, self.hyper(cfg))

    def round_start(self, run, k):
        if run.plan.applies_s:
            run.tickets[k].progress.target_norm0 = rounds.target_stats(
                trees.ticket(run.states, k).params, trees.ticket(run.plan.step.targets, k))[0]

    def epoch_scale(self, cfg, progress):
        if not cfg.rsst.reg_adaptive:
            return 1.0
        return regularizers.adaptive_scale(progress.last_val_acc, cfg.rsst.target_acc)

    def epoch_fields_of(self, run, k, metrics, scale):
        if not run.plan.applies_s:
            return {}
        norm, small, count = rounds.target_stats(trees.ticket(run.states.params, k),
                                                 trees.ticket(run.plan.step.targets, k))
        norm0 = run.tickets[k].progress.target_norm0
        return dict(reg_lambda=float(metrics["reg_lambda"][k, -1]), reg_scale=scale,
                    target_count=count, target_small_frac=small,
                    target_norm_rel=norm / norm0 if norm0 else 0.0)

    def finish_round(self, run, rows):
        """Apply S (M := S) and evaluate again: accuracy before and after."""
        if run.plan.applies_s:
            apply_s(run, rows)

    def round_text(self, row):
        if "rsst_acc_after" not in row:
            return ""
        text = f", RSST before/after S {row['rsst_acc_before']:.2f}/{row['rsst_acc_after']:.2f}%"
        if row.get("target_norm_rel") is not None:
            text += f", penalized weights keep {100 * row['target_norm_rel']:.1f}% of their norm"
            if row.get("predicted_norm_rel") is not None:
                text += f" (predicted {100 * row['predicted_norm_rel']:.1f}%)"
        if row.get("bn_recalibrate"):
            text += f", BatchNorm statistics from {row['bn_recalibrate']} batches"
        return text

    def round_warnings(self, row):
        kept, budget = row.get("target_norm_rel"), regularizers.PENALTY_BUDGET
        if kept is None or kept <= budget:
            return []
        cost = row["rsst_acc_before"] - row["rsst_acc_after"]
        return [f"warning: round {row['round']}'s penalized weights kept {100 * kept:.1f}% of "
                f"their norm (above {100 * budget:.0f}%; the loss gradient holds them against "
                f"the penalty), and removing them cost {cost:.2f} points; a larger "
                f"--reg_granularity_prune (or --block_loss_grad) shrinks them further"]

    def zero_weights_reason(self, summary_row):
        if "rsst_acc_after" not in summary_row:
            return None
        return ("an RSST round ends by setting its mask to the channel mask S, which keeps "
                "whole channels, but it trained with the magnitude mask M, which held the "
                "weights it prunes inside those channels at zero; they count as kept because "
                "their channels stay")

    def bar_fields(self, run, metrics):
        if not run.plan.applies_s:
            return {}
        return {"lambda": f"{float(np.asarray(metrics['reg_lambda'])[0, -1]):.3g}"}


def apply_s(run, rows) -> None:
    """The end of an RSST round: record the accuracy before, apply S (M := S) to every
    ticket, re-estimate BatchNorm statistics (--bn_recalibrate), evaluate again."""
    eng, ticks = run.engine, run.tickets
    for t, row in zip(ticks, rows):
        if row is not None:
            last = t.progress.history[-1]
            row.update(rsst_acc_before=last["test_acc"], final_lambda=last.get("reg_lambda"),
                       target_norm_rel=last.get("target_norm_rel"),
                       predicted_norm_rel=t.predicted)
    run.states, run.plan = trees.for_each(
        lambda k, s, pl: rounds.apply_channel_masks(eng.net, eng.param_shapes,
                                                    ticks[k].cfg.prune, s, pl),
        len(ticks), run.states, run.plan)
    if run.recalibrate_bn(after_s=True) is not None:
        for row in rows:
            if row is not None:
                row["bn_recalibrate"] = ticks[0].cfg.optim.bn_recalibrate
    val, test = eng.evaluate(run.states.variables, "val"), eng.evaluate(
        run.states.variables, "test")
    for k, row in enumerate(rows):
        if row is not None:
            row.update(final_val_acc=val[k]["acc"], final_test_acc=test[k]["acc"],
                       rsst_acc_after=test[k]["acc"])


__all__ = ["RSST", "RSSTConfig", "apply_s"]
