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
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rsst_jax import checkpoint as ckpt
from rsst_jax import compact as compact_lib
from rsst_jax import config as config_lib
from rsst_jax import criteria as criteria_lib
from rsst_jax import data as data_lib
from rsst_jax import masks as masks_lib
from rsst_jax import nets
from rsst_jax import parallel
from rsst_jax import pretrained as pretrained_lib
from rsst_jax import regularizers
from rsst_jax import runlock
from rsst_jax import train as train_lib

SUMMARY_FIELDS = ("round", "remaining_weight_pct", "channel_sparsity_pct", "best_val_acc",
                  "best_val_epoch", "test_acc_at_best_val", "final_val_acc", "final_test_acc",
                  "rsst_acc_before", "rsst_acc_after", "final_lambda", "epochs", "round_time_s",
                  "wall_time_s")


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


def build_model(cfg: config_lib.Config, num_classes: int, **kwargs):
    """The network of ``cfg``; ``--shortcut`` goes to the nets that have that option."""
    if cfg.shortcut != "A" and "shortcut" in nets.net_options(cfg.arch):
        kwargs["shortcut"] = cfg.shortcut
    return nets.get_net(cfg.arch, num_classes, **kwargs)


def _copy(tree):
    """An independent copy: the train step donates its input buffers."""
    return jax.tree_util.tree_map(jnp.copy, tree)


def _snapshot(state):
    return _copy({"params": state.params, "batch_stats": state.batch_stats})


@dataclasses.dataclass
class RoundPlan:
    """What a round trains with.

    ``masks`` are the kernel masks M; ``channel_masks`` is S in RSST rounds (applied at
    the round's end); ``train_masks`` is M extended to the BatchNorms of dead channels
    with --mask_bn, and ``targets`` the RSST penalty targets in that same structure
    (all False outside RSST rounds), so every round feeds the step the same pytree shapes.
    """
    masks: Any
    train_masks: Any
    targets: Any
    channel_masks: Any = None


# --------------------------------------------------------------------------- the run

def resume_source(cfg) -> Optional[pathlib.Path]:
    """The checkpoint directory a run of ``cfg`` resumes from, or None when it starts
    afresh; raises RunError where the run must not go on (a --save_dir holding a run
    without --resume, nothing to resume from, or checkpoints made with other flags).
    ``--resume`` on a run killed before its first checkpoint starts afresh (None)."""
    ckpt_dir = pathlib.Path(cfg.save_dir) / "checkpoints"
    if not cfg.resume:
        if ckpt.latest_step(ckpt_dir) is not None:
            raise RunError(f"--save_dir {cfg.save_dir} already holds a run; pass --resume to "
                           f"continue it, or choose another --save_dir")
        return None
    if cfg.checkpoint is None and ckpt.latest_step(ckpt_dir) is None:
        return None
    source = pathlib.Path(cfg.checkpoint) if cfg.checkpoint else ckpt_dir
    if ckpt.latest_step(source) is None:
        raise RunError(f"--resume: no checkpoint in {source}; start without --resume, or "
                       f"point --save_dir/--checkpoint at an existing run")
    listed = config_lib.semantic_diffs(ckpt.read_meta(source).get("config", {}), cfg.to_dict())
    if listed:
        raise RunError(f"--resume: {source} was made with a different configuration: "
                       f"{listed}; resume with the same flags, or start a new --save_dir")
    return source


class LotteryRun:
    """One run of ``pruning_times`` rounds in ``cfg.save_dir``."""

    def __init__(self, cfg: config_lib.Config, *, progress: bool = True,
                 log: Callable[[str], None] = None):
        self.cfg = cfg
        self.log = log or _print
        self.progress = progress
        self.dir = pathlib.Path(cfg.save_dir)
        self.seed = cfg.resolved_seed
        self.base_key = jax.random.PRNGKey(self.seed)

        self.ds = data_lib.load_dataset(cfg.dataset, cfg.data, seed=self.seed)
        # Several devices: batches split over a data-parallel mesh, all else replicated.
        self.mesh = parallel.data_mesh(batch_size=cfg.batch_size // cfg.accum_steps)
        n_dev = 1 if self.mesh is None else self.mesh.size
        if cfg.batch_size % (n_dev * cfg.accum_steps):
            raise RunError(f"--batch_size {cfg.batch_size} must be a multiple of {n_dev} devices "
                           f"x --accum_steps {cfg.accum_steps}; choose another batch size, or "
                           f"fewer devices with CUDA_VISIBLE_DEVICES")
        self.dev = parallel.replicate(data_lib.to_device(self.ds), self.mesh)
        # bf16: compute dtype only; params, optimizer state and BatchNorm statistics stay fp32.
        self.model = build_model(cfg, self.ds.num_classes, dtype=train_lib.compute_dtype(
            cfg.precision))
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
                                        std=tuple(self.ds.std), nan_skip=cfg.nan_policy == "skip",
                                        distill=cfg.distill, kd_temperature=cfg.kd_temperature,
                                        accum_steps=cfg.accum_steps)
        self._param_shapes = jax.eval_shape(self._fresh_state).params
        self.step_cfg = step_cfg
        step = train_lib.make_train_step(
            self.model, self.tx, step_cfg,
            batch_sharding=None if self.mesh is None else parallel.batch_sharding(self.mesh))
        n_extra = 2 if cfg.distill else 0  # (teacher, kd_alpha)
        self.step_fn = step
        self.step_traces = 0  # JAX traces (so compiles) of the step, alone or in a chunk

        def counted_step(*args):
            self.step_traces += 1  # Python runs here only while JAX traces
            return step(*args)

        self.train_step = parallel.jit_step(counted_step, self.mesh, n_extra)
        # multiseed.run sets this to train the epoch together with the other tickets.
        self.epoch_runner: Optional[Callable] = None
        # --fused: chunks of steps as one lax.scan (at most two programs: k and the
        # remainder), unrolled on CPU (train.fused_unroll).
        self.fused = train_lib.use_fused(cfg.fused)
        self.fused_steps = cfg.fused_steps or train_lib.default_fused_steps(cfg.print_freq)
        self.train_chunk = parallel.jit_chunk(train_lib.make_epoch_fn(counted_step), self.mesh,
                                              n_extra)
        self.eval_step = parallel.jit_eval(train_lib.make_eval_step(self.model, step_cfg),
                                           self.mesh, min(cfg.eval_batch_size,
                                                          len(self.ds.val_y), len(self.ds.test_y)))

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
        """Pretrained weights where names and shapes fit; the classifier (and a stem of
        another input size) stays freshly initialized."""
        try:
            variables, report = pretrained_lib.load_pretrained(self.cfg.pretrained, w0,
                                                               with_report=True)
        except pretrained_lib.PretrainedError as e:
            raise RunError(str(e)) from None
        self.log(f"--pretrained {self.cfg.pretrained}: loaded {len(report.loaded)} arrays, "
                 f"kept {len(report.fresh)} freshly initialized"
                 + (f" ({', '.join(p for p, _ in report.fresh[:4])})" if report.fresh else ""))
        return {"params": variables["params"], "batch_stats": variables["batch_stats"]}

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
            return self.make_plan(new)
        scores = self.channel_scores(variables, new, round_idx)
        channel = masks_lib.refill(new, scores, cfg.fillback_rate)
        if cfg.struct == "refill":
            return self.make_plan(channel)
        return self.make_plan(new, channel)

    def init_masks(self, params):
        """All-True masks of the prunable kernels; the stem is the first conv the input meets."""
        stem = compact_lib.stem_kernel(self.model, self.ds.image_shape)
        return masks_lib.init_masks(params, conv1=self.cfg.conv1, fc=self.cfg.prune_dense,
                                    stem=stem)

    def extend_masks(self, masks):
        """Kernel masks plus, with --mask_bn, masks of the BatchNorm scale/bias that follow
        each conv (False for channels whose kernel slice is all pruned)."""
        if not self.cfg.use_mask_bn:
            return masks
        bn = compact_lib.bn_masks(self.model, self._param_shapes, masks, self.ds.image_shape)
        return compact_lib.merge_masks(masks, bn)

    def make_plan(self, masks, channel_masks=None) -> RoundPlan:
        """The round's plan from M (and S for RSST): train masks and penalty targets.

        RSST targets are the weights kept by M and removed by S; with --mask_bn also the
        BatchNorm scale and bias of the channels S removes, because BatchNorm undoes any
        shrinking of a conv channel's weights until they reach zero.
        """
        train_masks = self.extend_masks(masks)
        if channel_masks is None:
            return RoundPlan(masks, train_masks, no_targets(train_masks))
        alive_m, alive_s = train_masks, self.extend_masks(channel_masks)
        targets = jax.tree_util.tree_map(
            lambda m, s: None if m is None else jnp.logical_and(m, jnp.logical_not(s)),
            alive_m, alive_s, is_leaf=lambda x: x is None)
        return RoundPlan(masks, train_masks, targets, channel_masks)

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

    # ------------------------------------------------------------------ the rounds
    def run(self) -> list[dict]:
        """Run (or resume) all rounds; returns the summary rows.

        Holds ``save_dir/run.lock`` throughout (see ``runlock``): a second run on the same
        ``--save_dir`` refuses to start, and a killed run leaves nothing stuck.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        with runlock.RunLock(self.dir, log=self.log):
            return self._run_locked()

    def _run_locked(self) -> list[dict]:
        cfg = self.cfg
        template_state = self._fresh_state()
        template_masks = self.init_masks(template_state.params)
        source = resume_source(cfg)
        if cfg.resume and source is None:
            # Killed before its first checkpoint: resuming is starting (W0 comes from init/).
            self.log(f"--resume: {self.ckpt_dir} holds no checkpoint yet; starting the run")
        if source is not None:
            state, plan, rewind, prog = self._restore(source, template_state, template_masks)
            self.log(f"resuming {self.dir} at round {prog.round}, epoch {prog.epoch}")
            self._rewrite_log(prog.history)
        else:
            state = self.load_or_make_init(template_state)
            plan = self.make_plan(template_masks)
            state = state.replace(params=masks_lib.apply_masks(state.params, plan.train_masks))
            rewind = _snapshot(state)
            state = self._start_round(state, 0)
            prog = Progress()
            (self.dir / "log.jsonl").write_text("")
        self._write_config()
        if cfg.struct == "rsst" and cfg.optimizer == "sgd" and cfg.pruning_times > 1:
            self._warn_stability()

        self._saved = 0
        self.teacher = self.load_teacher()
        while prog.round < cfg.pruning_times:
            state, plan, rewind = self._run_round(state, plan, rewind, prog)
        return prog.rows

    def _run_round(self, state, plan: RoundPlan, rewind, prog: "Progress"):
        cfg, r = self.cfg, prog.round
        if prog.epoch == 0:
            prog.best = {"val_acc": -1.0, "epoch": -1, "test_acc": None}
            prog.round_start = prog.elapsed
            prog.target_norm0 = (_target_stats(state.params, plan.targets)[0]
                                 if plan.channel_masks is not None else None)
        for epoch in range(prog.epoch, cfg.epochs):
            t0 = time.time()
            reg_scale = (regularizers.adaptive_scale(prog.last_val_acc, cfg.target_acc)
                         if cfg.reg_adaptive else 1.0)
            state, train_metrics = self._train_epoch(state, plan, r, epoch, reg_scale)
            val = self.evaluate(state.variables, "val")
            test = self.evaluate(state.variables, "test")
            prog.last_val_acc = val["acc"]
            row = {"round": r, "epoch": epoch, **train_metrics, "val_acc": val["acc"],
                   "val_loss": val["loss"], "test_acc": test["acc"], "test_loss": test["loss"],
                   "lr": float(self.lr_fn(int(state.step) - 1))}
            if plan.channel_masks is not None:
                norm, small, count = _target_stats(state.params, plan.targets)
                row.update(reg_lambda=float(self.reg_schedule(int(state.step) - 1)) * reg_scale,
                           reg_scale=reg_scale, target_count=count, target_small_frac=small,
                           target_norm_rel=norm / prog.target_norm0 if prog.target_norm0 else 0.0)
            if val["acc"] > prog.best["val_acc"]:
                prog.best = {"val_acc": val["acc"], "epoch": epoch, "test_acc": test["acc"]}
                ckpt.save(self.dir / f"round_{r}" / "best", epoch,
                          {"params": state.params, "batch_stats": state.batch_stats,
                           "masks": plan.masks},
                          {"round": r, "epoch": epoch, "val_acc": val["acc"],
                           "test_acc": test["acc"]})
            if r == 0 and cfg.prune_type == "rewind_lt" and epoch + 1 == cfg.rewind_epoch:
                rewind = _snapshot(state)
            row["time_s"] = time.time() - t0
            prog.history.append(row)
            if self.progress and not sys.stderr.isatty():  # no live bar: one line per epoch
                self.log(f"round {r} epoch {epoch + 1}/{cfg.epochs}: loss "
                         f"{row['train_loss']:.4f}, train {row['train_acc']:.2f}%, val "
                         f"{row['val_acc']:.2f}%, test {row['test_acc']:.2f}%"
                         + (f", lambda {row['reg_lambda']:.3g}" if "reg_lambda" in row else ""))
            with open(self.dir / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            prog.epoch = epoch + 1
            prog.elapsed += time.time() - t0
            self._save(state, plan, rewind, prog)

        # End of the round: apply S (RSST), record, prune, rewind.
        t1 = time.time()
        last = prog.history[-1]
        row = {"round": r, "best_val_acc": prog.best["val_acc"],
               "best_val_epoch": prog.best["epoch"],
               "test_acc_at_best_val": prog.best["test_acc"], "epochs": cfg.epochs,
               "final_val_acc": last["val_acc"], "final_test_acc": last["test_acc"]}
        if plan.channel_masks is not None:
            row.update(rsst_acc_before=last["test_acc"], final_lambda=last.get("reg_lambda"))
            plan = self.make_plan(plan.channel_masks)
            state = state.replace(params=masks_lib.apply_masks(state.params, plan.train_masks))
            row["final_val_acc"] = self.evaluate(state.variables, "val")["acc"]
            row["final_test_acc"] = row["rsst_acc_after"] = self.evaluate(state.variables,
                                                                          "test")["acc"]
        row.update(remaining_weight_pct=100.0 * masks_lib.density(plan.masks),
                   channel_sparsity_pct=100.0 * masks_lib.channel_sparsity(plan.masks))
        ckpt.save(self.dir / f"round_{r}" / "final", cfg.epochs,
                  {"params": state.params, "batch_stats": state.batch_stats, "masks": plan.masks},
                  {"round": r, "summary": row, "arch": cfg.arch, "dataset": cfg.dataset,
                   "num_classes": self.ds.num_classes})
        if r == 0 and cfg.distill:
            self.teacher = self.load_teacher()
        if r + 1 < cfg.pruning_times:
            plan = self.prune_and_plan(state.variables, plan.masks, r)
            rewound = _copy(rewind)
            state = self._start_round(state.replace(
                params=masks_lib.apply_masks(rewound["params"], plan.train_masks),
                batch_stats=rewound["batch_stats"]), r + 1)
        prog.elapsed += time.time() - t1
        row.update(round_time_s=round(prog.elapsed - prog.round_start, 2),
                   wall_time_s=round(prog.elapsed, 2))
        prog.rows.append(row)
        summary_rows_to_files(self.dir, prog.rows)
        self.log(_round_line(row))
        prog.round, prog.epoch = r + 1, 0
        self._save(state, plan, rewind, prog)
        return state, plan, rewind

    def step_extras(self, state, round_idx: int) -> tuple:
        """Extra train-step arguments: (teacher variables, kd_alpha) with --distill."""
        if not self.cfg.distill:
            return ()
        if round_idx == 0 or self.teacher is None:
            # Round 0 trains the teacher itself: alpha 0 and any finite stand-in (not the
            # state's own buffers, which the step donates).
            if getattr(self, "_stand_in_teacher", None) is None:
                self._stand_in_teacher = _copy(state.variables)
            return self._stand_in_teacher, jnp.float32(0.0)
        return self.teacher, jnp.float32(self.cfg.kd_alpha)

    def load_teacher(self):
        """The dense round-0 network (round_0/final), teacher of later rounds with --distill."""
        if not self.cfg.distill or ckpt.latest_step(self.dir / "round_0" / "final") is None:
            return None
        template = self._fresh_state()
        tree, _ = ckpt.restore(self.dir / "round_0" / "final",
                               {"params": template.params, "batch_stats": template.batch_stats,
                                "masks": self.init_masks(template.params)})
        return {"params": tree["params"], "batch_stats": tree["batch_stats"]}

    def _start_round(self, state, round_idx: int):
        """Fresh optimizer state, LR schedule and augmentation stream for a round."""
        state = train_lib.reset_optimizer(state, self.tx)
        return state.replace(rng=jax.random.fold_in(jax.random.fold_in(self.base_key, 1),
                                                    round_idx))

    def _train_epoch(self, state, plan: RoundPlan, r: int, epoch: int, reg_scale: float):
        cfg = self.cfg
        key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(self.base_key, 2), r),
                                 epoch)
        perm = train_lib.epoch_permutation(key, self.ds.train_x.shape[0], cfg.batch_size)
        nb = int(perm.shape[0])
        perm = np.asarray(perm)
        scale = jnp.float32(reg_scale)
        # On a mesh: state, masks and targets replicated (a no-op once they are), batches split.
        state, masks, targets = parallel.replicate((state, plan.train_masks, plan.targets),
                                                   self.mesh)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=nb, leave=False, dynamic_ncols=True, disable=None,
                       desc=f"round {r}/{cfg.pruning_times - 1} epoch {epoch + 1}/{cfg.epochs}")
        metrics, done, counted, correct_so_far = [], 0, 0, 0
        if self.epoch_runner is not None:  # --num_seeds: one vmapped epoch for all tickets
            state, m = self.epoch_runner(state, masks, targets, perm, scale)
            metrics, done = [m], nb
        while done < nb:
            extras = parallel.replicate(self.step_extras(state, r), self.mesh)
            if self.fused:  # one compiled scan per chunk; the bar advances per chunk
                n = min(self.fused_steps, nb - done)
                state, m = self.train_chunk(state, self.dev["train_x"], self.dev["train_y"],
                                            parallel.shard_batch(perm[done:done + n], self.mesh, 1),
                                            masks, targets, scale, *extras)
                last_loss = lambda: m["loss"][-1]  # noqa: E731
            else:
                n = 1
                state, m = self.train_step(state, self.dev["train_x"], self.dev["train_y"],
                                           parallel.shard_batch(perm[done], self.mesh, 0),
                                           masks, targets, scale, *extras)
                last_loss = lambda: m["loss"]  # noqa: E731
            metrics.append(m)
            done += n
            if bar is not None and (self.fused or done % cfg.print_freq == 0 or done == nb):
                correct_so_far += sum(int(np.sum(x["correct"])) for x in metrics[counted:])
                counted = len(metrics)
                post = {"loss": f"{float(last_loss()):.3f}",
                        "acc": f"{100.0 * correct_so_far / (done * cfg.batch_size):.1f}"}
                if plan.channel_masks is not None:
                    lam = float(self.reg_schedule(int(state.step) - 1)) * reg_scale
                    post["lambda"] = f"{lam:.3g}"
                bar.set_postfix(post, refresh=False)
                bar.update(done - bar.n)
        if bar is not None:
            bar.close()
        join = jnp.concatenate if np.ndim(metrics[0]["loss"]) else jnp.stack  # [n] or scalars
        loss = np.asarray(join([m["loss"] for m in metrics]))
        correct = np.asarray(join([m["correct"] for m in metrics]))
        finite = np.asarray(join([m["finite"] for m in metrics])).astype(bool)
        if not finite.all():
            first = int(np.argmin(finite))
            where = f"round {r}, epoch {epoch}, step {first} of the epoch"
            if cfg.nan_policy == "stop":
                raise TrainingDiverged(
                    f"the loss became {loss[first]} at {where}; the last good checkpoint is "
                    f"kept. Lower --lr, cap the penalty with --reg_upper_limit, or pass "
                    f"--nan_policy skip")
            self.log(f"skipped {int((~finite).sum())} batches with a non-finite loss "
                     f"(first at {where})")
        if not train_lib.tree_is_finite(state.params):
            raise TrainingDiverged(f"parameters became NaN/Inf in round {r}, epoch {epoch}; the "
                                   f"last good checkpoint is kept. Lower --lr or set "
                                   f"--reg_upper_limit")
        return state, {"train_loss": float(loss[finite].mean()) if finite.any() else float("nan"),
                       "train_acc": 100.0 * float(correct[finite].sum())
                       / max(1, int(finite.sum()) * cfg.batch_size)}

    # ------------------------------------------------------------------ persistence
    @property
    def ckpt_dir(self) -> pathlib.Path:
        return self.dir / "checkpoints"

    def _save(self, state, plan: RoundPlan, rewind, prog: "Progress"):
        meta = dict(dataclasses.asdict(prog), has_channel_masks=plan.channel_masks is not None,
                    config=self.cfg.to_dict())
        ckpt.save(self.ckpt_dir, prog.round * (self.cfg.epochs + 1) + prog.epoch,
                  _checkpoint_tree(state, plan, rewind), meta, keep=2)
        self._saved += 1
        stop_after = os.environ.get("RSST_JAX_STOP_AFTER")
        if stop_after and self._saved >= int(stop_after):
            raise Interrupted(75)

    def _restore(self, source: pathlib.Path, template_state, template_masks):
        plan_t = RoundPlan(template_masks, None, None)
        tree, meta = ckpt.restore(source, _checkpoint_tree(template_state, plan_t,
                                                           _snapshot(template_state)))
        plan = self.make_plan(tree["masks"],
                              tree["channel_masks"] if meta["has_channel_masks"] else None)
        fields = {f.name for f in dataclasses.fields(Progress)}
        prog = Progress(**{k: v for k, v in meta.items() if k in fields})
        return tree["state"], plan, tree["rewind"], prog

    def _rewrite_log(self, history):
        _atomic_write(self.dir / "log.jsonl", "".join(json.dumps(row) + "\n" for row in history))

    def _write_config(self):
        resolved = dict(self.cfg.to_dict(), seed=self.seed, resume=False, checkpoint=None)
        _atomic_write(self.dir / "config.json", json.dumps(resolved, indent=1))

    def _warn_stability(self):
        step = regularizers.first_unstable_step(self.reg_schedule, self.lr_fn, self.cfg.momentum,
                                                self.total_steps)
        if step is not None:
            self.log(f"warning: lr * lambda crosses 2 * (1 + momentum) at step {step} of "
                     f"{self.total_steps} in each RSST round; SGD will diverge there. Set "
                     f"--reg_upper_limit or a smaller --reg_granularity_prune")



@dataclasses.dataclass
class Progress:
    """Where a run stands; saved as JSON with every checkpoint."""
    round: int = 0
    epoch: int = 0                 # epochs finished in this round
    history: list = dataclasses.field(default_factory=list)   # one row per epoch, all rounds
    rows: list = dataclasses.field(default_factory=list)      # one summary row per round
    best: Optional[dict] = None
    elapsed: float = 0.0           # training wall time so far, seconds
    round_start: float = 0.0
    last_val_acc: Optional[float] = None
    target_norm0: Optional[float] = None


class Interrupted(SystemExit):
    """Raised by the RSST_JAX_STOP_AFTER test hook to stop a run between checkpoints."""


def _print(message: str) -> None:
    print(message, flush=True)  # flushed: runs are often followed through a log file


def run(cfg: config_lib.Config, *, progress: bool = True, log: Callable[[str], None] = None
        ) -> list[dict]:
    """Run (or resume) the rounds of ``cfg``; returns the summary rows."""
    return LotteryRun(cfg, progress=progress, log=log).run()


def _checkpoint_tree(state, plan: RoundPlan, rewind):
    channel = plan.channel_masks if plan.channel_masks is not None else plan.masks
    return {"state": state, "masks": plan.masks, "channel_masks": channel, "rewind": rewind}


def _target_stats(params, targets):
    """(L2 norm of targeted weights, fraction of them below 1e-3, count)."""
    sq, small, count = 0.0, 0, 0
    flat_t = jax.tree_util.tree_leaves(targets, is_leaf=lambda x: x is None)
    for w, t in zip(jax.tree_util.tree_leaves(params), flat_t):
        if t is None:
            continue
        w, t = np.asarray(w), np.asarray(t)
        sq += float(np.sum((w * t) ** 2))
        small += int(np.sum((np.abs(w) < 1e-3) & t))
        count += int(t.sum())
    return float(np.sqrt(sq)), (small / count if count else 0.0), count


def _round_line(row) -> str:
    text = (f"round {row['round']}: remaining {row['remaining_weight_pct']:.2f}% weights, "
            f"channel sparsity {row['channel_sparsity_pct']:.2f}%, best val "
            f"{row['best_val_acc']:.2f}% (epoch {row['best_val_epoch']}), test at best val "
            f"{row['test_acc_at_best_val']:.2f}%, final test {row['final_test_acc']:.2f}%")
    if "rsst_acc_after" in row:
        text += f", RSST before/after S {row['rsst_acc_before']:.2f}/{row['rsst_acc_after']:.2f}%"
    return text + f" ({row['round_time_s']:.0f} s)"


def _atomic_write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def summary_rows_to_files(save_dir: pathlib.Path, rows: list[dict]) -> None:
    """Write summary.json and summary.csv atomically (temp file + rename)."""
    _atomic_write(save_dir / "summary.json", json.dumps(rows, indent=1))
    tmp = save_dir / "summary.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow(row)
    os.replace(tmp, save_dir / "summary.csv")
