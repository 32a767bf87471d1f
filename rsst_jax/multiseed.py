"""``--num_seeds K``: K independent tickets of one configuration, trained as one program.

Seeds ``seed .. seed+K-1`` each get a complete ``LotteryRun`` in ``save_dir/seed_<s>/``
(own W0, masks, pruning, criteria, checkpoints and summary; each directory is an
ordinary run that resumes, analyses and compares like any other). The runs proceed in
K threads; at every epoch each hands its training steps to a shared ``Lockstep``, which
stacks the K states, masks, RSST targets and batch orders and runs the epoch as one
``jax.vmap``-ed compiled program. Evaluation, pruning and checkpoints stay per ticket.

For small networks one vmapped step over K tickets keeps the device far busier than K
separate runs (docs/performance.md has the measured images/s for K = 1, 4, 8).
"""
from __future__ import annotations

import pathlib
import threading
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rsst_jax import config as config_lib
from rsst_jax import lottery
from rsst_jax import train as train_lib

_IS_NONE = lambda x: x is None  # noqa: E731


def seed_configs(cfg: config_lib.Config) -> list[config_lib.Config]:
    """One single-seed config per ticket: ``save_dir/seed_<s>`` (and ``--init``/seed_<s>)."""
    base = cfg.resolved_seed
    out = []
    for i in range(cfg.num_seeds):
        s = base + i
        out.append(cfg.replace(
            seed=s, num_seeds=1, save_dir=str(pathlib.Path(cfg.save_dir) / f"seed_{s}"),
            init=None if cfg.init is None else str(pathlib.Path(cfg.init) / f"seed_{s}")))
    return out


def _stack(trees):
    flat = [jax.tree_util.tree_flatten(t, is_leaf=_IS_NONE) for t in trees]
    treedef = flat[0][1]
    leaves = [None if xs[0] is None else jnp.stack(xs) for xs in zip(*(f[0] for f in flat))]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _unstack(tree, k: int):
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_IS_NONE)
    return [jax.tree_util.tree_unflatten(treedef, [None if x is None else x[i] for x in leaves])
            for i in range(k)]


class Lockstep:
    """Collects one epoch from every active ticket and runs them as one vmapped program.

    ``train_epoch(slot, state, masks, targets, perm[nb, B], scale)`` blocks until every
    ticket still running has submitted its epoch; then the last one to arrive runs the
    K epochs together and each caller gets ``(state, metrics)`` with [nb] metric arrays.
    A ticket that finishes or fails calls ``leave(slot)``; missing tickets are filled in
    with a copy of another one (results discarded), so one compiled program serves all.
    """

    def __init__(self, step_fn, num_seeds: int, data_x, data_y, *, fused: bool = False,
                 fused_steps: int = 50):
        self.vstep = jax.jit(train_lib.make_multi_seed_step(step_fn), donate_argnums=(0,))
        self.vchunk = jax.jit(train_lib.make_multi_seed_step(train_lib.make_epoch_fn(step_fn)),
                              donate_argnums=(0,))
        self.k = num_seeds
        self.data_x, self.data_y = data_x, data_y
        self.fused, self.fused_steps = fused, fused_steps
        self.active = set(range(num_seeds))
        self.pending: dict = {}
        self.results: dict = {}
        self.cond = threading.Condition()

    def train_epoch(self, slot: int, state, masks, targets, perm, scale):
        with self.cond:
            self.pending[slot] = (state, masks, targets, np.asarray(perm), scale)
            self._maybe_run()
            while slot not in self.results:
                self.cond.wait()
            out = self.results.pop(slot)
        if isinstance(out, BaseException):
            raise out
        return out

    def leave(self, slot: int) -> None:
        with self.cond:
            self.active.discard(slot)
            self._maybe_run()

    def _maybe_run(self):  # called holding the lock
        if not self.pending or not self.active.issubset(self.pending):
            return
        slots = sorted(self.pending)
        reqs = [self.pending[s] for s in slots]
        reqs += [reqs[0]] * (self.k - len(reqs))
        try:
            outs = self._run(reqs)
        except Exception as e:  # every waiting ticket sees the failure
            outs = [e] * len(slots)
        for i, s in enumerate(slots):
            self.results[s] = outs[i]
        self.pending.clear()
        self.cond.notify_all()

    def _run(self, reqs):
        states = _stack([r[0] for r in reqs])
        masks, targets = _stack([r[1] for r in reqs]), _stack([r[2] for r in reqs])
        perms = np.stack([r[3] for r in reqs])          # [K, nb, B]
        scales = jnp.asarray([r[4] for r in reqs], jnp.float32)
        nb = perms.shape[1]
        metrics, done = [], 0
        while done < nb:
            if self.fused:
                n = min(self.fused_steps, nb - done)
                states, m = self.vchunk(states, self.data_x, self.data_y, perms[:, done:done + n],
                                        masks, targets, scales)
            else:
                n = 1
                states, m = self.vstep(states, self.data_x, self.data_y, perms[:, done], masks,
                                       targets, scales)
                m = {key: v[:, None] for key, v in m.items()}
            metrics.append(m)
            done += n
        metrics = {key: jnp.concatenate([m[key] for m in metrics], axis=1) for key in metrics[0]}
        per_state = _unstack(states, self.k)
        return [(per_state[i], {key: v[i] for key, v in metrics.items()})
                for i in range(len(reqs))]


def run(cfg: config_lib.Config, *, progress: bool = True,
        log: Optional[Callable[[str], None]] = None) -> list[list[dict]]:
    """Train ``cfg.num_seeds`` tickets in lockstep; returns each ticket's summary rows."""
    log = log or print
    configs = seed_configs(cfg)
    runs = []
    for c in configs:
        runs.append(lottery.LotteryRun(c, progress=False,
                                       log=lambda s, seed=c.seed: log(f"seed {seed}: {s}")))
    first = runs[0]
    # The K tickets are the parallelism: training runs on one device (evaluation may
    # still split its batches over a mesh).
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    dev = jax.device_put(dict(first.dev), one)
    step = train_lib.make_train_step(first.model, first.tx, first.step_cfg)  # no mesh
    lock = Lockstep(step, len(runs), dev["train_x"], dev["train_y"],
                    fused=first.fused, fused_steps=first.fused_steps)
    for slot, r in enumerate(runs):
        r.mesh = None                      # no replication of states onto a mesh
        r.dev = dev                        # one copy of the data set on the device
        r.eval_step = first.eval_step      # one compiled evaluation
        r.epoch_runner = (lambda state, masks, targets, perm, scale, slot=slot:
                          lock.train_epoch(slot, state, masks, targets, perm, scale))
    results: list = [None] * len(runs)
    errors: list = [None] * len(runs)

    def work(slot):
        try:
            results[slot] = runs[slot].run()
        except BaseException as e:  # reported below, after every ticket has stopped
            errors[slot] = e
        finally:
            lock.leave(slot)

    threads = [threading.Thread(target=work, args=(i,), name=f"seed_{c.seed}")
               for i, c in enumerate(configs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [(c.seed, e) for c, e in zip(configs, errors) if e is not None]
    for seed, e in failed[1:]:
        log(f"seed {seed} failed: {e.__class__.__name__}: {e}")
    if failed:
        raise failed[0][1]
    return results


__all__ = ["seed_configs", "Lockstep", "run"]
