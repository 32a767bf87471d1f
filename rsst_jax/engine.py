"""The compiled programs of K tickets that train as one program, and the data they read.

An :class:`Engine` is built from K configurations that differ only in groupable
settings (``config.Flag.groupable``: seeds, learning rate, lambda schedule, rates,
criteria): one network, one data set on the device, one optimizer chain (the method's
transformation first, ``Method.transform``), and jit-compiled
programs over a leading ticket axis: the train step, the fused chunk of steps and the
evaluation (``train.over_tickets``: for K > 1 ``jax.vmap`` on accelerators and the
tickets' steps written one after another on CPU; for K = 1 the very program a ticket
runs alone, data parallel over a mesh where there are several devices). Where several
devices are visible, K > 1 tickets are spread over them (``parallel.ticket_mesh``:
each of t devices trains K/t tickets, no communication between tickets).
Everything a ticket has of its own (weights, masks, targets, learning rate, lambda
values, batch order) is an argument, so the programs compile once per run.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from rsst_jax import data as data_lib
from rsst_jax import config as config_lib
from rsst_jax import methods, nets, parallel, rounds, trees
from rsst_jax import train as train_lib


class EngineError(ValueError):
    """Settings the engine cannot run; the message says what to change."""


def model_options(model_cfg) -> dict:
    """Keyword options of ``nets.get_net`` that the configuration sets (``--shortcut``)."""
    if model_cfg.shortcut != "A" and "shortcut" in nets.net_options(model_cfg.arch):
        return {"shortcut": model_cfg.shortcut}
    return {}


def build_model(model_cfg, num_classes: int, **kwargs):
    """The network of ``model_cfg`` (``--arch``, its options, ``--precision``)."""
    kwargs.setdefault("dtype", train_lib.compute_dtype(model_cfg.precision))
    return nets.get_net(model_cfg.arch, num_classes, **model_options(model_cfg), **kwargs)


def penalty_of(cfg):
    """What ``cfg``'s method adds to the train step (``methods.Penalty``), or None."""
    return methods.of(cfg).penalty(cfg)


def hyper_of(cfg) -> train_lib.Hyper:
    """A ticket's schedule values (``train.Hyper``): its learning rate and the values its
    method's lambda schedule reads."""
    penalty = penalty_of(cfg)
    return train_lib.Hyper.make(cfg.optim.lr, None if penalty is None else penalty.values)


def optimizer_of(cfg):
    """The optax chain of ``cfg`` (the method's transformation, weight decay, masks,
    SGD/Adam/AdamW)."""
    o, penalty = cfg.optim, penalty_of(cfg)
    return train_lib.make_optimizer(optimizer=o.optimizer, momentum=o.momentum,
                                    weight_decay=o.weight_decay,
                                    penalty=None if penalty is None else penalty.transform)


def schedules_of(cfg, steps_per_epoch: int) -> train_lib.Schedules:
    """A round's step counts and learning-rate schedule (``train.Schedules``) of ``cfg``."""
    return train_lib.Schedules.of(cfg.optim, steps_per_epoch)


def step_config_of(cfg, ds: data_lib.Dataset) -> train_lib.StepConfig:
    """The static settings of ``cfg``'s train step on data set ``ds``."""
    o = cfg.optim
    return train_lib.StepConfig(flip=ds.flip, mean=tuple(ds.mean), std=tuple(ds.std),
                                nan_skip=cfg.run.nan_policy == "skip", distill=o.distill,
                                kd_temperature=o.kd_temperature, accum_steps=o.accum_steps)


def eval_program(model, step_cfg, num_tickets: int, mesh, batch_size: int, ticket_mesh=None):
    """The compiled evaluation: over the tickets for K > 1 (spread over ``ticket_mesh``
    where given), else on the data mesh."""
    eval_step = train_lib.make_eval_step(model, step_cfg)
    if num_tickets > 1:
        per_device = num_tickets // (ticket_mesh.size if ticket_mesh is not None else 1)
        return parallel.jit_over_tickets(train_lib.eval_over_tickets(eval_step, per_device),
                                         ticket_mesh, (True, False, False, False))
    return parallel.jit_eval(eval_step, mesh, batch_size)


class Engine:
    """Data on the device and the compiled programs of ``len(configs)`` tickets."""

    def __init__(self, configs: Sequence, *, dataset: Optional[data_lib.Dataset] = None,
                 devices: Optional[Sequence[jax.Device]] = None):
        """``devices``: those the programs may use (default: every visible one)."""
        try:
            config_lib.check_groupable(configs)
        except config_lib.ConfigError as e:
            raise EngineError(str(e)) from None
        cfg = configs[0]
        self.configs, self.k = list(configs), len(configs)
        o, r = cfg.optim, cfg.run
        ds = dataset or data_lib.load_dataset(cfg.data.dataset, cfg.data.data)
        self.ds = data_lib.train_subset(ds, cfg.data.train_subset)
        # One ticket: batches split over a data-parallel mesh; K tickets: spread over
        # the devices, K/t on each of t (no mesh where t = 1).
        self.mesh = parallel.data_mesh(devices, batch_size=o.batch_size // o.accum_steps) \
            if self.k == 1 else None
        self.ticket_mesh = parallel.ticket_mesh(self.k, devices) if self.k > 1 else None
        self.ticket_devices = 1 if self.ticket_mesh is None else self.ticket_mesh.size
        self.k_per_device = self.k // self.ticket_devices
        n_dev = 1 if self.mesh is None else self.mesh.size
        self.device_count = n_dev if self.ticket_mesh is None else self.ticket_devices
        if o.batch_size % (n_dev * o.accum_steps):
            raise EngineError(f"--batch_size {o.batch_size} must be a multiple of {n_dev} "
                              f"devices x --accum_steps {o.accum_steps}; choose another batch "
                              f"size, or fewer devices with CUDA_VISIBLE_DEVICES")
        self.dev = parallel.replicate(data_lib.to_device(self.ds),
                                      self.mesh if self.mesh is not None else self.ticket_mesh)
        self.model = build_model(cfg.model, self.ds.num_classes)
        self.net = rounds.Network(self.model, self.ds.image_shape)
        self.steps_per_epoch = train_lib.steps_per_epoch(self.ds.train_x.shape[0], o.batch_size)
        self.method = methods.of(cfg)
        self.penalty = penalty_of(cfg)
        self.schedules = schedules_of(cfg, self.steps_per_epoch)
        self.tx, self.step_cfg = optimizer_of(cfg), step_config_of(cfg, self.ds)
        sharding = None if self.mesh is None else parallel.batch_sharding(self.mesh)
        step = train_lib.gather_step(train_lib.make_train_step(
            self.model, self.tx, self.step_cfg, self.schedules, batch_sharding=sharding,
            lambda_schedule=None if self.penalty is None else self.penalty.schedule))
        self.step_traces = 0  # JAX traces (so compiles) of the step, alone or in a chunk

        def counted(*args):
            self.step_traces += 1  # Python runs here only while JAX traces
            return step(*args)

        self.train_step = self._train_program(counted, batch_axis=1)
        self.train_chunk = self._train_program(train_lib.make_epoch_fn(counted), batch_axis=2)
        self.fused = train_lib.use_fused(r.fused)
        self.fused_steps = r.fused_steps or train_lib.default_fused_steps(
            r.print_freq, num_tickets=self.k_per_device)
        self._eval = eval_program(self.model, self.step_cfg, self.k, self.mesh, min(
            o.eval_batch_size, len(self.ds.val_y), len(self.ds.test_y)), self.ticket_mesh)

    def _train_program(self, fn, batch_axis: int):
        """``fn(state, data_x, data_y, idx, plan)`` of one ticket, compiled over the
        tickets: on the data mesh (K = 1), spread over the ticket mesh, or on one device."""
        if self.ticket_mesh is not None:
            return parallel.jit_over_tickets(train_lib.over_tickets(fn, self.k_per_device),
                                             self.ticket_mesh, (True, False, False, True, True),
                                             donate_argnums=(0,))
        return parallel.jit_train(train_lib.over_tickets(fn, self.k), self.mesh,
                                  batch_axis=batch_axis)

    # ------------------------------------------------------------------ tickets
    def plan(self, cfg, masks, channel_masks=None) -> rounds.RoundPlan:
        """The plan of ticket ``cfg``'s round trained with kernel masks M = ``masks``,
        ending by applying ``channel_masks`` S where given (``rounds.plan_round``), its
        penalty acting on its method's targets (``Method.targets``)."""
        method = methods.of(cfg)
        return rounds.plan_round(self.net, self.param_shapes, cfg.prune, masks, channel_masks,
                                 targets=lambda alive, alive_s: method.targets(
                                     cfg, self.net, alive, alive_s),
                                 hyper=hyper_of(cfg))

    def fresh_state(self, seed: int) -> train_lib.TrainState:
        """A ticket's initial state: W0 drawn from ``seed``, a fresh optimizer."""
        key = jax.random.fold_in(jax.random.PRNGKey(seed), rounds.KEY_INIT)
        return train_lib.create_train_state(self.model, self.tx, key, self.ds.image_shape)

    def place(self, tree):
        """``tree`` (stacked over the tickets) where the programs read it: replicated
        over the data mesh (K = 1; over every process's devices in a run of several),
        split over the ticket mesh, or as it is on one device. Arrays restored from a
        checkpoint and arrays a program made then mix in one computation."""
        if self.ticket_mesh is not None:
            return parallel.put_tickets(tree, self.ticket_mesh)
        return parallel.replicate(tree, self.mesh)

    @functools.cached_property
    def param_shapes(self):
        """The parameters' shapes and dtypes (for masks and plans without weights)."""
        return jax.eval_shape(lambda: self.fresh_state(0)).params

    # ------------------------------------------------------------------ one ticket, your loop
    def step(self, state, batch, plan: train_lib.Plan):
        """One train step of a single ticket on a host ``batch`` (uint8 images, labels),
        through the very program a run compiles (``train_step``, the batch as the data
        it gathers from), so a custom loop computes what ``experiments.run --fused off``
        does, to the last bit. ``state`` is consumed (its buffers are reused)."""
        images, labels = (np.asarray(a) for a in batch)
        idx = np.arange(len(labels), dtype=np.int32)[None]
        states, m = self.train_step(trees.stack([state]), images, labels,
                                    parallel.shard_batch(idx, self.mesh, 1), trees.stack([plan]))
        return trees.ticket(states, 0), trees.ticket(m, 0)

    def accuracy(self, variables, split: str) -> float:
        """Accuracy (%) of one ticket's ``variables`` on the ``val`` or ``test`` split."""
        return self.evaluate(trees.stack([variables]), split)[0]["acc"]

    # ------------------------------------------------------------------ programs
    def train_epoch(self, states, plan: train_lib.Plan, perms: np.ndarray,
                    on_chunk: Optional[Callable] = None):
        """Train every ticket through ``perms`` [K, steps, B]: fused chunks of
        ``fused_steps`` steps (the last one shorter) or one step at a time.
        ``on_chunk(done, total, metrics)`` follows along. Returns the states and the
        metrics as numpy arrays [K, steps]."""
        states, plan = parallel.replicate((states, plan), self.mesh)
        states, plan = parallel.put_tickets((states, plan), self.ticket_mesh)
        nb, done, chunks = perms.shape[1], 0, []
        while done < nb:
            if self.fused:
                n = min(self.fused_steps, nb - done)
                idx = parallel.shard_batch(perms[:, done:done + n], self.mesh, 2)
                states, m = self.train_chunk(states, self.dev["train_x"], self.dev["train_y"],
                                             idx, plan)
            else:
                n = 1
                idx = parallel.shard_batch(perms[:, done], self.mesh, 1)
                states, m = self.train_step(states, self.dev["train_x"], self.dev["train_y"],
                                            idx, plan)
                m = {key: v[:, None] for key, v in m.items()}
            chunks.append(m)
            done += n
            if on_chunk is not None:
                on_chunk(done, nb, m)
        return states, {key: np.concatenate([np.asarray(c[key]) for c in chunks], axis=1)
                        for key in chunks[0]}

    def evaluate(self, variables, split: str) -> list[dict]:
        """Accuracy (%) and mean loss of every ticket (``variables`` stacked [K, ...]) on
        the ``val`` or ``test`` split."""
        x, y, bs = self.dev[f"{split}_x"], self.dev[f"{split}_y"], self.configs[0].optim.eval_batch_size
        if self.k == 1:
            return [train_lib.evaluate(self._eval, trees.ticket(variables, 0), x, y, bs)]
        return train_lib.evaluate(self._eval, variables, x, y, bs)


def epoch_perms(engine: Engine, seeds: Sequence[int], round_idx: int, epoch: int
                ) -> np.ndarray:
    """[K, steps, B] batch indices of every ticket's epoch (from 0; drop_last)."""
    n, bs = engine.ds.train_x.shape[0], engine.configs[0].optim.batch_size
    return np.stack([rounds.epoch_indices(jax.random.PRNGKey(s), n, bs, round_idx, epoch)
                     for s in seeds])


def score_batches(engine: Engine, seed: int, round_idx: int, count: int):
    """The criterion's (batches, key) of ticket ``seed`` after round ``round_idx``."""
    return rounds.criteria_batches(jax.random.PRNGKey(seed), engine.dev["train_x"],
                                   engine.dev["train_y"], engine.configs[0].optim.batch_size,
                                   round_idx, count)


def penalty_state(engine: Engine, opt_state):
    """The state of the method's transformation inside ``opt_state`` (first in the chain,
    ``train.make_optimizer``), or None without a penalty."""
    return None if engine.penalty is None else opt_state[0]


def devices_text(engine: Engine) -> str:
    """Where the tickets train, for the start line: '1 device', 't devices (K/t tickets
    each)', 'batches split over n devices' (``engine.device_count`` counts them)."""
    if engine.device_count == 1:
        return "1 device"
    if engine.ticket_mesh is not None:
        return f"{engine.ticket_devices} devices ({engine.k_per_device} ticket(s) each)"
    return f"batches split over {engine.device_count} devices"


def recalibrated(engine: Engine, state, n: Optional[int]):
    """One ticket's ``state`` with its BatchNorm statistics re-estimated over ``n``
    training batches (None: ``--bn_recalibrate``'s default, :func:`bn_count`;
    ``recalibrate_bn``; an engine of one ticket), as a run does where it applies S."""
    return trees.ticket(recalibrate_bn(engine, trees.stack([state]), n), 0)


def ticket_meta(engine: Engine, cfg) -> dict:
    """What a checkpoint of ticket ``cfg`` records about the network (for the loaders)."""
    return {"arch": cfg.model.arch, "dataset": cfg.data.dataset,
            "num_classes": engine.ds.num_classes, "image_shape": list(engine.ds.image_shape),
            "model_options": model_options(cfg.model)}


def bn_count(engine: Engine, n: Optional[int]) -> int:
    """The batches ``--bn_recalibrate n`` re-estimates over (``train.bn_batch_count``):
    ``n``, or for None the fewest that hold ``config.BN_IMAGES`` training images; 0: off."""
    return train_lib.bn_batch_count(engine.ds.train_x.shape[0],
                                    engine.configs[0].optim.batch_size, n,
                                    config_lib.BN_IMAGES)


def bn_batches(engine: Engine, n: Optional[int]) -> np.ndarray:
    """[n, B] training indices of ``recalibrate_bn`` (``train.bn_batch_indices``; n as
    :func:`bn_count` reads it)."""
    try:
        return train_lib.bn_batch_indices(engine.ds.train_x.shape[0],
                                          engine.configs[0].optim.batch_size,
                                          bn_count(engine, n))
    except ValueError as e:
        raise EngineError(str(e)) from None


def recalibrate_bn(engine: Engine, states, n: Optional[int]):
    """``states`` (stacked [K, ...]) with every ticket's BatchNorm statistics re-estimated
    over ``bn_batches(engine, n)`` in one compiled program (``train.make_bn_recalibration``,
    compiled once per engine); weights and optimizer state unchanged."""
    program = getattr(engine, "_bn_program", None)
    if program is None:
        fn = train_lib.make_bn_recalibration(engine.model, engine.step_cfg)
        program = parallel.jit_over_tickets(  # each device its own tickets' statistics
            train_lib.ticket_map(fn, engine.k_per_device, (0, None, None)),
            engine.ticket_mesh, (True, False, False))
        engine._bn_program = program
    stats = program(states.variables, engine.dev["train_x"], bn_batches(engine, n))
    return states.replace(batch_stats=stats)


__all__ = ["Engine", "EngineError", "build_model", "model_options", "hyper_of", "penalty_of",
           "penalty_state", "devices_text", "recalibrated", "epoch_perms", "score_batches",
           "optimizer_of",
           "schedules_of", "ticket_meta",
           "step_config_of", "eval_program", "bn_count", "bn_batches", "recalibrate_bn"]
