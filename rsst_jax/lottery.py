"""The iterative procedure (SPEC section 2): train, prune, structure, rewind, repeat.

``run(cfg)`` drives the rounds, writes the run directory (see ``checkpoint``) and
resumes from the newest epoch checkpoint. All decisions are pure functions from
``masks``, ``criteria`` and ``regularizers``; this module holds the side effects.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rsst_jax import checkpoint as ckpt
from rsst_jax import config as config_lib
from rsst_jax import criteria as criteria_lib
from rsst_jax import data as data_lib
from rsst_jax import masks as masks_lib
from rsst_jax import nets
from rsst_jax import regularizers
from rsst_jax import train as train_lib

SUMMARY_FIELDS = ("round", "remaining_weight_pct", "channel_sparsity_pct", "best_val_acc",
                  "best_val_epoch", "test_acc_at_best_val", "final_val_acc", "final_test_acc",
                  "rsst_acc_before", "rsst_acc_after", "final_lambda", "epochs", "wall_time_s")


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; the message names round, epoch and step."""


class RunError(RuntimeError):
    """A run directory or input that cannot be used; the message says what to do."""


# --------------------------------------------------------------------------- helpers

def _tree_where(tree, fn):
    """Map ``fn`` over the array leaves of a mask-like tree, keeping None leaves."""
    return jax.tree_util.tree_map(fn, tree, is_leaf=lambda x: x is None)


def no_targets(masks):
    return _tree_where(masks, lambda m: None if m is None else jnp.zeros_like(m))


def check_same_shapes(template, tree, what: str):
    ts = jax.tree_util.tree_structure(template)
    try:
        ls = jax.tree_util.tree_structure(tree)
    except Exception:
        ls = None
    if ts != ls:
        raise RunError(f"{what} does not match the network: different parameter structure")
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(template)[0],
                            jax.tree_util.tree_leaves(tree)):
        if np.shape(a) != np.shape(b):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            raise RunError(f"{what} does not match the network at {name}: "
                           f"shape {np.shape(b)} vs {np.shape(a)}")


def _masks_to_host(masks):
    return _tree_where(masks, lambda m: None if m is None else np.asarray(m))


@dataclasses.dataclass
class RoundPlan:
    """What a round trains with: weight mask, RSST targets and the channel mask to apply."""
    masks: Any
    targets: Any
    channel_masks: Any = None  # S for RSST rounds, applied at the round's end


# --------------------------------------------------------------------------- the run

class LotteryRun:
    """One run of ``pruning_times`` rounds in ``cfg.save_dir``."""

    def __init__(self, cfg: config_lib.Config, *, progress: bool = True,
                 log: Callable[[str], None] = print):
        self.cfg = cfg
        self.log = log
        self.progress = progress
        self.dir = pathlib.Path(cfg.save_dir)
        self.seed = cfg.resolved_seed
        self.base_key = jax.random.PRNGKey(self.seed)

        self.ds = data_lib.load_dataset(cfg.dataset, cfg.data, seed=self.seed)
        self.dev = data_lib.to_device(self.ds)
        self.model = nets.get_net(cfg.arch, self.ds.num_classes,
                                  **({"shortcut": cfg.shortcut} if cfg.arch.endswith("s")
                                     and cfg.arch.startswith("res") else {}))
        n_train = self.ds.train_x.shape[0]
        self.steps_per_epoch = train_lib.steps_per_epoch(n_train, cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.lr_fn = train_lib.lr_schedule(cfg.lr, self.steps_per_epoch, cfg.warmup, cfg.milestones)
        self.reg_schedule = regularizers.lambda_schedule(
            cfg.RST_schedule, total_steps=self.total_steps, granularity=cfg.reg_granularity_prune,
            exponents=cfg.exponents, update_interval=cfg.update_reg_interval,
            upper_limit=cfg.reg_upper_limit, progress=cfg.reg_progress,
            steps_per_epoch=self.steps_per_epoch)
        self.tx = train_lib.make_optimizer(
            optimizer=cfg.optimizer, lr=self.lr_fn, momentum=cfg.momentum,
            weight_decay=cfg.weight_decay, reg_schedule=self.reg_schedule,
            block_loss_grad=cfg.block_loss_grad)
        step_cfg = train_lib.StepConfig(flip=self.ds.flip, mean=tuple(self.ds.mean),
                                        std=tuple(self.ds.std), nan_skip=cfg.nan_policy == "skip")
        self.train_step = jax.jit(train_lib.make_train_step(self.model, self.tx, step_cfg),
                                  donate_argnums=(0,))
        self.eval_step = jax.jit(train_lib.make_eval_step(self.model, step_cfg))

    # ------------------------------------------------------------------ init / rewind
    def _fresh_state(self) -> train_lib.TrainState:
        return train_lib.create_train_state(self.model, self.tx, jax.random.fold_in(self.base_key, 0),
                                            self.ds.image_shape)

    def load_or_make_init(self, state: train_lib.TrainState) -> train_lib.TrainState:
        """W0 from --init if it exists, else written there (two runs can share a ticket's init)."""
        init_dir = pathlib.Path(self.cfg.init) if self.cfg.init else self.dir / "init"
        template = {"params": state.params, "batch_stats": state.batch_stats}
        if ckpt.latest_step(init_dir) is not None:
            raw, _ = ckpt.restore_raw(init_dir)
            check_same_shapes(template, {"params": raw.get("params"),
                                         "batch_stats": raw.get("batch_stats", {})},
                              f"--init {init_dir}")
            w0, _ = ckpt.restore(init_dir, template)
            self.log(f"loaded initialization from {init_dir}")
        else:
            w0 = template
            ckpt.save(init_dir, 0, w0, {"arch": self.cfg.arch, "dataset": self.cfg.dataset,
                                        "seed": self.seed})
        if self.cfg.prune_type == "pt":
            w0 = self._merge_pretrained(w0)
        return state.replace(params=w0["params"], batch_stats=w0["batch_stats"])

    def _merge_pretrained(self, w0):
        """Pretrained weights everywhere except the classifier (and the stem unless shapes fit)."""
        raw, _ = ckpt.restore_raw(self.cfg.pretrained)
        src = {"params": raw.get("params", raw), "batch_stats": raw.get("batch_stats", {})}
        flat_dst = {jax.tree_util.keystr(p): v for p, v in
                    jax.tree_util.tree_flatten_with_path(w0)[0]}
        flat_src = {jax.tree_util.keystr(p): v for p, v in
                    jax.tree_util.tree_flatten_with_path(src)[0]}
        missing = [k for k in flat_dst if k not in flat_src]
        if len(missing) == len(flat_dst):
            raise RunError(f"--pretrained {self.cfg.pretrained}: no parameter names in common "
                           f"with {self.cfg.arch}")
        mismatched = [k for k, v in flat_dst.items() if k in flat_src
                      and np.shape(flat_src[k]) != np.shape(v)]
        classifier = [k for k in mismatched if np.ndim(flat_dst[k]) <= 2]
        bad = [k for k in mismatched if k not in classifier]
        if bad:
            raise RunError(f"--pretrained {self.cfg.pretrained} does not match {self.cfg.arch}: "
                           f"{bad[0]} has shape {np.shape(flat_src[bad[0]])}, "
                           f"expected {np.shape(flat_dst[bad[0]])}")
        leaves = []
        for path, v in jax.tree_util.tree_flatten_with_path(w0)[0]:
            k = jax.tree_util.keystr(path)
            keep_fresh = k not in flat_src or k in classifier
            leaves.append(v if keep_fresh else jnp.asarray(flat_src[k], v.dtype))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(w0), leaves)

    # ------------------------------------------------------------------ pruning
    def prune_and_plan(self, variables, masks, round_idx: int) -> RoundPlan:
        """After round ``round_idx``: IMP prune of the trained weights, then structure."""
        cfg = self.cfg
        params = variables["params"]
        rate = cfg.rate_at(round_idx)
        scope = "layerwise" if cfg.layer_rate_map else cfg.prune_scope
        if cfg.prune_method == "magnitude":
            new = masks_lib.magnitude_prune(params, masks, rate, scope=scope,
                                            layer_rates=cfg.layer_rate_map or None)
        elif cfg.prune_method == "random":
            key = jax.random.fold_in(jax.random.fold_in(self.base_key, 7), round_idx)
            new = masks_lib.random_prune(key, masks, rate, scope=scope)
        else:
            new = masks_lib.filter_prune(params, masks, rate)
        if cfg.struct == "none":
            return RoundPlan(masks=new, targets=no_targets(new))
        scores = self.channel_scores(variables, new, round_idx)
        channel = masks_lib.refill(new, scores, cfg.fillback_rate)
        if cfg.struct == "refill":
            return RoundPlan(masks=channel, targets=no_targets(channel))
        return RoundPlan(masks=new, targets=masks_lib.rsst_targets(new, channel),
                         channel_masks=channel)

    def channel_scores(self, variables, masks, round_idx):
        cfg = self.cfg
        key = jax.random.fold_in(jax.random.fold_in(self.base_key, 11), round_idx)
        perm = train_lib.epoch_permutation(key, self.ds.train_x.shape[0], cfg.batch_size)
        batches = []
        for b in range(min(cfg.criteria_batches, perm.shape[0])):
            idx = perm[b]
            x = data_lib.normalize(self.dev["train_x"][idx], self.ds.mean, self.ds.std)
            batches.append((x, self.dev["train_y"][idx]))
        return criteria_lib.channel_scores(
            cfg.criteria, self.model.apply, variables, masks, batches, key=key,
            num_batches=len(batches), hessian_samples=cfg.hessian_samples)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, variables, split: str) -> dict:
        return train_lib.evaluate(self.eval_step, variables, self.dev[f"{split}_x"],
                                  self.dev[f"{split}_y"], self.cfg.eval_batch_size)


def summary_rows_to_files(save_dir: pathlib.Path, rows: list[dict]) -> None:
    """Write summary.json and summary.csv atomically (temp file + rename)."""
    tmp = save_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, save_dir / "summary.json")
    tmp = save_dir / "summary.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow(row)
    os.replace(tmp, save_dir / "summary.csv")


# --------------------------------------------------------------------------- the loop

def _stop_after_hook():
    """Tests interrupt a run after N epoch checkpoints (RSST_JAX_STOP_AFTER=N)."""
    value = os.environ.get("RSST_JAX_STOP_AFTER")
    return int(value) if value else None


class Interrupted(SystemExit):
    pass


def _target_stats(params, targets, norm0=None):
    """(L2 norm of targeted weights, fraction of them below 1e-3) over all targeted leaves."""
    sq, small, count = 0.0, 0, 0
    for w, t in zip(jax.tree_util.tree_leaves(params),
                    jax.tree_util.tree_leaves(_tree_where(targets, lambda m: m), is_leaf=lambda x: x is None)):
        if t is None:
            continue
        w = np.asarray(w)
        t = np.asarray(t)
        sq += float(np.sum((w * t) ** 2))
        small += int(np.sum((np.abs(w) < 1e-3) & t))
        count += int(t.sum())
    norm = float(np.sqrt(sq))
    return norm, (small / count if count else 0.0), count


def _leaf_pairs(params, masks):
    """Yield (param leaf, mask leaf or None) in flatten order of params."""
    flat_m = jax.tree_util.tree_leaves(masks, is_leaf=lambda x: x is None)
    return zip(jax.tree_util.tree_leaves(params), flat_m)


def run(cfg: config_lib.Config, *, progress: bool = True, log: Callable[[str], None] = print
        ) -> list[dict]:
    """Run (or resume) the rounds of ``cfg``; returns the summary rows."""
    return LotteryRun(cfg, progress=progress, log=log).run()


def _fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def _run(self: LotteryRun) -> list[dict]:
    cfg = self.cfg
    R, E = cfg.pruning_times, cfg.epochs
    self.dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = self.dir / "checkpoints"
    template_state = self._fresh_state()
    template_masks = masks_lib.init_masks(template_state.params, conv1=cfg.conv1, fc=cfg.prune_dense)

    if cfg.resume:
        state, plan, rewind, meta = self._restore(template_state, template_masks, ckpt_dir)
        r, e = meta["round"], meta["epoch"]
        history, rows = meta["history"], meta["rows"]
        best, elapsed = meta["best"], meta["elapsed"]
        last_val, norm0 = meta["last_val_acc"], meta["target_norm0"]
        self.log(f"resuming {self.dir} at round {r}, epoch {e}")
        self._rewrite_log(history)
    else:
        if ckpt.latest_step(ckpt_dir) is not None:
            raise RunError(f"--save_dir {self.dir} already holds a run; pass --resume to continue "
                           f"it, or choose another --save_dir")
        state = self.load_or_make_init(template_state)
        masks = template_masks
        plan = RoundPlan(masks=masks, targets=no_targets(masks))
        rewind = {"params": state.params, "batch_stats": state.batch_stats}
        state = self._start_round(state, 0)
        r, e, history, rows, best, elapsed, last_val = 0, 0, [], [], None, 0.0, None
        norm0 = None
        (self.dir / "log.jsonl").write_text("")
    self._write_config()
    if cfg.struct == "rsst" and cfg.optimizer == "sgd" and R > 1:
        self._warn_stability()

    stop_after = _stop_after_hook()
    saved = 0
    while r < R:
        t_round = time.time()
        if e == 0:
            best = {"val_acc": -1.0, "epoch": -1, "test_acc": None}
            norm0 = _target_stats(state.params, plan.targets)[0] if plan.channel_masks is not None else None
        for epoch in range(e, E):
            reg_scale = (regularizers.adaptive_scale(last_val, cfg.target_acc)
                         if cfg.reg_adaptive and last_val is not None else 1.0)
            t0 = time.time()
            state, train_metrics = self._train_epoch(state, plan, r, epoch, reg_scale)
            variables = state.variables
            val = self.evaluate(variables, "val")
            test = self.evaluate(variables, "test")
            last_val = val["acc"]
            row = {"round": r, "epoch": epoch, **train_metrics, "val_acc": val["acc"],
                   "val_loss": val["loss"], "test_acc": test["acc"], "test_loss": test["loss"],
                   "lr": float(self.lr_fn(int(state.step) - 1)), "time_s": time.time() - t0}
            if plan.channel_masks is not None:
                lam = float(self.reg_schedule(int(state.step) - 1)) * reg_scale
                norm, small, count = _target_stats(state.params, plan.targets)
                row.update(reg_lambda=lam, reg_scale=reg_scale,
                           target_norm_rel=norm / norm0 if norm0 else 0.0,
                           target_small_frac=small, target_count=count)
            history.append(row)
            with open(self.dir / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if val["acc"] > best["val_acc"]:
                best = {"val_acc": val["acc"], "epoch": epoch, "test_acc": test["acc"]}
                ckpt.save(self.dir / f"round_{r}" / "best", epoch,
                          {"params": state.params, "batch_stats": state.batch_stats,
                           "masks": plan.masks},
                          {"round": r, "epoch": epoch, "val_acc": val["acc"], "test_acc": test["acc"]})
            if r == 0 and cfg.prune_type == "rewind_lt" and epoch + 1 == cfg.rewind_epoch:
                rewind = {"params": state.params, "batch_stats": state.batch_stats}
            elapsed += time.time() - t0
            self._save(ckpt_dir, state, plan, rewind, r, epoch + 1, history, rows, best, elapsed,
                       last_val, norm0)
            saved += 1
            if stop_after is not None and saved >= stop_after:
                raise Interrupted(75)

        # ---- end of round
        t1 = time.time()
        variables = state.variables
        final_val = history[-1]["val_acc"]
        final_test = history[-1]["test_acc"]
        row = {"round": r, "best_val_acc": best["val_acc"], "best_val_epoch": best["epoch"],
               "test_acc_at_best_val": best["test_acc"], "epochs": E}
        if plan.channel_masks is not None:
            row["rsst_acc_before"] = final_test
            row["final_lambda"] = history[-1].get("reg_lambda")
            plan = RoundPlan(masks=plan.channel_masks, targets=no_targets(plan.channel_masks))
            state = state.replace(params=masks_lib.apply_masks(state.params, plan.masks))
            variables = state.variables
            final_val = self.evaluate(variables, "val")["acc"]
            final_test = self.evaluate(variables, "test")["acc"]
            row["rsst_acc_after"] = final_test
        row.update(remaining_weight_pct=100.0 * masks_lib.density(plan.masks),
                   channel_sparsity_pct=100.0 * masks_lib.channel_sparsity(plan.masks),
                   final_val_acc=final_val, final_test_acc=final_test)
        ckpt.save(self.dir / f"round_{r}" / "final", E,
                  {"params": state.params, "batch_stats": state.batch_stats, "masks": plan.masks},
                  {"round": r, "summary": row, "arch": cfg.arch, "dataset": cfg.dataset,
                   "num_classes": self.ds.num_classes})
        if r + 1 < R:
            plan = self.prune_and_plan(variables, plan.masks, r)
            params = masks_lib.apply_masks(rewind["params"], plan.masks)
            state = self._start_round(state.replace(params=params,
                                                    batch_stats=rewind["batch_stats"]), r + 1)
        elapsed += time.time() - t1
        row["wall_time_s"] = round(elapsed, 2)
        rows.append(row)
        summary_rows_to_files(self.dir, rows)
        self.log(f"round {r}: remaining {row['remaining_weight_pct']:.2f}% weights, "
                 f"channel sparsity {row['channel_sparsity_pct']:.2f}%, best val "
                 f"{row['best_val_acc']:.2f}% (epoch {row['best_val_epoch']}), test at best val "
                 f"{_fmt(row['test_acc_at_best_val'])}%, final test {row['final_test_acc']:.2f}%"
                 + (f", RSST before/after S {row['rsst_acc_before']:.2f}/{row['rsst_acc_after']:.2f}%"
                    if "rsst_acc_after" in row else ""))
        r, e = r + 1, 0
        elapsed_before_next = elapsed
        self._save(ckpt_dir, state, plan, rewind, r, 0, history, rows, None, elapsed_before_next,
                   last_val, None)
    return rows


LotteryRun.run = _run


def _start_round(self: LotteryRun, state, round_idx: int):
    """Fresh optimizer state, LR schedule and augmentation stream for a round."""
    state = train_lib.reset_optimizer(state, self.tx)
    return state.replace(rng=jax.random.fold_in(jax.random.fold_in(self.base_key, 1), round_idx))


def _train_epoch(self: LotteryRun, state, plan: RoundPlan, r: int, epoch: int, reg_scale: float):
    cfg = self.cfg
    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(self.base_key, 2), r), epoch)
    perm = train_lib.epoch_permutation(key, self.ds.train_x.shape[0], cfg.batch_size)
    nb = int(perm.shape[0])
    scale = jnp.float32(reg_scale)
    bar = None
    if self.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=nb, desc=f"round {r}/{cfg.pruning_times - 1} epoch {epoch + 1}/{cfg.epochs}",
                   leave=False, dynamic_ncols=True)
    losses, corrects, finites = [], [], []
    for b in range(nb):
        state, m = self.train_step(state, self.dev["train_x"], self.dev["train_y"], perm[b],
                                   plan.masks, plan.targets, scale)
        losses.append(m["loss"]); corrects.append(m["correct"]); finites.append(m["finite"])
        if bar is not None and ((b + 1) % cfg.print_freq == 0 or b + 1 == nb):
            post = {"loss": f"{float(m['loss']):.3f}",
                    "acc": f"{100.0 * float(jnp.sum(jnp.stack(corrects))) / ((b + 1) * cfg.batch_size):.1f}"}
            if plan.channel_masks is not None:
                post["lambda"] = f"{float(self.reg_schedule(int(state.step) - 1)) * reg_scale:.3g}"
            bar.set_postfix(post, refresh=False)
            bar.update((b + 1) - bar.n)
    if bar is not None:
        bar.close()
    finite = np.asarray(jnp.stack(finites))
    loss = np.asarray(jnp.stack(losses))
    if not finite.all():
        first = int(np.argmin(finite))
        where = f"round {r}, epoch {epoch}, step {first} of the epoch"
        if cfg.nan_policy == "stop":
            raise TrainingDiverged(
                f"the loss became {loss[first]} at {where}; the last good checkpoint is kept. "
                f"Lower --lr, cap the penalty with --reg_upper_limit, or pass --nan_policy skip")
        self.log(f"skipped {int((~finite).sum())} batches with a non-finite loss ({where} first)")
    if not train_lib.tree_is_finite(state.params):
        raise TrainingDiverged(f"parameters became NaN/Inf in round {r}, epoch {epoch}; the last "
                               f"good checkpoint is kept. Lower --lr or cap --reg_upper_limit")
    ok = finite.astype(bool)
    return state, {"train_loss": float(loss[ok].mean()) if ok.any() else float("nan"),
                   "train_acc": 100.0 * float(np.asarray(jnp.stack(corrects))[ok].sum())
                   / max(1, int(ok.sum()) * cfg.batch_size)}


def _checkpoint_tree(state, plan: RoundPlan, rewind):
    channel = plan.channel_masks if plan.channel_masks is not None else plan.masks
    return {"state": state, "masks": plan.masks, "targets": plan.targets,
            "channel_masks": channel, "rewind": rewind}


def _save(self: LotteryRun, ckpt_dir, state, plan, rewind, r, e, history, rows, best, elapsed,
          last_val, norm0):
    meta = {"round": r, "epoch": e, "history": history, "rows": rows, "best": best,
            "elapsed": elapsed, "last_val_acc": last_val, "target_norm0": norm0,
            "has_channel_masks": plan.channel_masks is not None,
            "config": self.cfg.to_dict()}
    ckpt.save(ckpt_dir, r * (self.cfg.epochs + 1) + e, _checkpoint_tree(state, plan, rewind), meta,
              keep=2)


def _restore(self: LotteryRun, template_state, template_masks, ckpt_dir):
    cfg = self.cfg
    source = pathlib.Path(cfg.checkpoint) if cfg.checkpoint else ckpt_dir
    if ckpt.latest_step(source) is None:
        raise RunError(f"--resume: no checkpoint in {source}; start without --resume, or point "
                       f"--save_dir/--checkpoint at an existing run")
    meta = ckpt.read_meta(source)
    saved = meta.get("config", {})
    diffs = [k for k, v in cfg.to_dict().items()
             if k not in config_lib.NON_SEMANTIC and k in saved and saved[k] != v]
    if diffs:
        listed = ", ".join(f"--{k} {saved[k]!r} (now {getattr(cfg, k)!r})" for k in diffs[:5])
        raise RunError(f"--resume: {source} was made with a different configuration: {listed}; "
                       f"resume with the same flags, or start a new --save_dir")
    rewind_t = {"params": template_state.params, "batch_stats": template_state.batch_stats}
    plan_t = RoundPlan(masks=template_masks, targets=no_targets(template_masks))
    tree, meta = ckpt.restore(source, _checkpoint_tree(template_state, plan_t, rewind_t))
    plan = RoundPlan(masks=tree["masks"], targets=tree["targets"],
                     channel_masks=tree["channel_masks"] if meta["has_channel_masks"] else None)
    return tree["state"], plan, tree["rewind"], meta


def _rewrite_log(self: LotteryRun, history):
    tmp = self.dir / "log.jsonl.tmp"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    os.replace(tmp, self.dir / "log.jsonl")


def _write_config(self: LotteryRun):
    resolved = dict(self.cfg.to_dict(), seed=self.seed, resume=False, checkpoint=None)
    tmp = self.dir / "config.json.tmp"
    tmp.write_text(json.dumps(resolved, indent=1))
    os.replace(tmp, self.dir / "config.json")


def _warn_stability(self: LotteryRun):
    step = regularizers.first_unstable_step(self.reg_schedule, self.lr_fn, self.cfg.momentum,
                                            self.total_steps)
    if step is not None:
        self.log(f"warning: lr * lambda crosses 2 * (1 + momentum) at step {step} of "
                 f"{self.total_steps} in each RSST round; SGD will diverge there. Set "
                 f"--reg_upper_limit or a smaller --reg_granularity_prune")


for _fn in (_start_round, _train_epoch, _save, _restore, _rewrite_log, _write_config,
            _warn_stability):
    setattr(LotteryRun, _fn.__name__, _fn)
