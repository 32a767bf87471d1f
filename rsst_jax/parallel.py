"""Devices: one ticket data parallel over a mesh, K tickets spread over the devices.

One ticket, mesh axis ``data``: the batch axis of every batch is split over it;
parameters, optimizer state, masks, RSST targets and the training images are
replicated. ``jit`` sees global arrays, so BatchNorm's batch mean and variance inside
the step are over the global batch (XLA inserts the all-reduce), exactly as on one
device. No ``pmap``.

K tickets, mesh axis ``tickets`` (``ticket_mesh``): the leading ticket axis of the
states, plans and batch indices is split over t devices (t the largest divisor of K
that is at most the device count), the data set is replicated, and each device runs
the program of its K/t tickets (``jit_over_tickets``: a ``shard_map`` with no
collective, so tickets never communicate); with K/t = 1 a device runs exactly the
program of a ticket alone.

Several hosts: call ``jax.distributed.initialize()`` before anything else; ``jax.devices()``
then lists every host's devices, ``data_mesh()`` spans them all, and ``replicate`` builds
global arrays from the copy every process holds (every process loads the same data set
and derives the same initialization from the seed). See docs/performance.md.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
TICKET_AXIS = "tickets"
CPU_DEVICES_ENV = "RSST_JAX_CPU_DEVICES"
CACHE_ENV = "RSST_JAX_CACHE"


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rsst_jax", "jax")


def enable_compilation_cache(path: Optional[str] = None) -> Optional[str]:
    """Keep compiled programs on disk, so the next run of the same configuration (a sweep's
    next cell, a resume, a rerun) skips XLA compilation.

    ``path`` defaults to $RSST_JAX_CACHE, else ``~/.cache/rsst_jax/jax``; ``off`` turns it
    off. An explicit $JAX_COMPILATION_CACHE_DIR wins (JAX reads it itself). Programs that
    compile in under a second are not stored. Returns the directory used, or None.
    """
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    where = path or os.environ.get(CACHE_ENV) or default_cache_dir()
    if where.strip().lower() in ("off", "0", "none", "false"):
        return None
    try:
        os.makedirs(where, exist_ok=True)
    except OSError:  # an unwritable home: compile every time, as without the cache
        return None
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return where


def split_cpu(n: Optional[int] = None) -> int:
    """Make the host CPU ``n`` XLA devices, so that a CPU run is data parallel over them.

    Call it before any JAX operation (entry points do, first thing). ``n`` defaults to
    $RSST_JAX_CPU_DEVICES, else 1 (off); an explicit ``--xla_force_host_platform_device_count``
    in $XLA_FLAGS wins. Measured on a 2-core machine (docs/performance.md): res20s at
    batch 128 trains 1.5x faster over 4 CPU devices than on one (each device's quarter
    batch stays in cache and both cores stay busy), but vgg16_bn 1.5x slower, hence opt-in.
    Accelerators are not affected (the mesh spans the default backend's devices).
    Returns the device count set (0: left as it was).
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return 0
    n = int(n or os.environ.get(CPU_DEVICES_ENV, 1))
    if n > 1:
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError:  # backends already initialized (e.g. in a test session)
            return 0
    return n


class DistributedError(ValueError):
    """Bad settings for several processes; the message says what to change."""


def slurm_tasks() -> int:
    """Tasks of the SLURM job step this process belongs to (``srun``), 1 outside one."""
    if "SLURM_PROCID" not in os.environ:
        return 1
    try:
        return int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or 1)
    except ValueError:
        return 1


def init_distributed(coordinator_address: Optional[str] = None,
                     num_processes: Optional[int] = None,
                     process_id: Optional[int] = None) -> int:
    """Join the processes of one run (``jax.distributed.initialize``) before JAX computes
    anything; returns the process count (1: nothing to join).

    With ``coordinator_address`` (HOST:PORT of process 0), ``num_processes`` and
    ``process_id`` say who is who; without them, a process started by ``srun`` in a job
    step of several tasks joins its step's other tasks (JAX reads SLURM's variables).
    Every process loads the same data and derives the same initialization from the seed;
    the devices of all of them form one mesh (``data_mesh``)."""
    if coordinator_address is None:
        if num_processes is not None or process_id is not None:
            raise DistributedError("--num_processes and --process_id need "
                                   "--coordinator_address HOST:PORT (process 0's address)")
        if slurm_tasks() < 2:
            return 1
        jax.distributed.initialize()
        return jax.process_count()
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"--coordinator_address wants HOST:PORT, e.g. 10.0.0.1:1234, "
                               f"got {coordinator_address!r}")
    if num_processes is None or num_processes < 1:
        raise DistributedError("--coordinator_address needs --num_processes N (N >= 1)")
    if process_id is None or not 0 <= process_id < num_processes:
        raise DistributedError(f"--process_id must be 0 .. {num_processes - 1} (this "
                               f"process's rank), got {process_id}")
    if num_processes == 1:
        return 1
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return num_processes


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; the only one alone)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait until every process of the run got here (nothing to wait for alone)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def mesh_size(n_devices: int, batch_size: int, platform: str) -> int:
    """Devices a batch of ``batch_size`` is split over: all of them; on CPU, whose devices
    are slices of one processor, the most that divide the batch evenly."""
    if batch_size % n_devices == 0 or platform != "cpu":
        return n_devices
    return max(d for d in range(1, n_devices + 1) if batch_size % d == 0)


def data_mesh(devices: Optional[Sequence[jax.Device]] = None,
              batch_size: Optional[int] = None) -> Optional[Mesh]:
    """A 1-D mesh over ``devices`` (default: all of them); None for a single device.

    With ``batch_size``, CPU devices are limited to a count that divides it (see
    ``mesh_size``); accelerators are all used and the caller checks divisibility.
    """
    devices = list(jax.devices() if devices is None else devices)
    if batch_size is not None and devices:
        devices = devices[:mesh_size(len(devices), batch_size, devices[0].platform)]
    if len(devices) < 2:
        return None
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def ticket_devices(num_tickets: int, n_devices: int) -> int:
    """Devices K tickets are spread over: the largest divisor of K that is at most
    ``n_devices`` (each device then trains the same number of tickets)."""
    return max(d for d in range(1, max(1, min(num_tickets, n_devices)) + 1)
               if num_tickets % d == 0)


def ticket_mesh(num_tickets: int, devices: Optional[Sequence[jax.Device]] = None
                ) -> Optional[Mesh]:
    """A 1-D ``tickets`` mesh over the devices ``num_tickets`` tickets are spread over
    (``ticket_devices``); None where that is one device."""
    devices = list(jax.devices() if devices is None else devices)
    t = ticket_devices(num_tickets, len(devices))
    if t < 2:
        return None
    return Mesh(np.asarray(devices[:t]), (TICKET_AXIS,))


def ticket_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (ticket) axis split over ``mesh``'s tickets axis."""
    return NamedSharding(mesh, P(TICKET_AXIS))


def put_tickets(tree: Any, mesh: Optional[Mesh]) -> Any:
    """Every array leaf of ``tree`` (leading ticket axis) split over ``mesh``."""
    return tree if mesh is None else _put_all(tree, ticket_sharding(mesh))


def jit_over_tickets(fn, mesh: Optional[Mesh], ticket_args: Sequence[bool],
                     donate_argnums: tuple = ()):
    """``jax.jit`` of ``fn`` (a program over a leading ticket axis of the arguments
    flagged in ``ticket_args``, the others shared, every output with a ticket axis).
    On a ``tickets`` mesh each device runs ``fn`` on its own slice of the tickets
    (``fn`` must then be built for K/t tickets) and the shared arguments are
    replicated; nothing crosses devices. Without a mesh, plain ``jax.jit``."""
    if mesh is None:
        return jax.jit(fn, donate_argnums=donate_argnums)
    specs = tuple(P(TICKET_AXIS) if t else P() for t in ticket_args)
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(TICKET_AXIS),
                           check_vma=False)
    jitted = jax.jit(mapped, donate_argnums=donate_argnums,
                     in_shardings=tuple(NamedSharding(mesh, s) for s in specs),
                     out_shardings=ticket_sharding(mesh))

    def placed(args):
        return [put_tickets(a, mesh) if t else replicate(a, mesh)
                for a, t in zip(args, ticket_args)]

    def call(*args):
        return jitted(*placed(args))
    call.lower = lambda *args: jitted.lower(*placed(args))
    return call


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Split axis ``batch_axis`` over the mesh, replicate the rest."""
    return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


def _put(x, sharding):
    if x is None:
        return None
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)  # every process holds the same value (same seed, same data)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: Any, mesh: Optional[Mesh]) -> Any:
    """Every array leaf of ``tree`` replicated over ``mesh`` (identity when mesh is None)."""
    return tree if mesh is None else _put_all(tree, replicated(mesh))


def _put_all(tree: Any, sharding) -> Any:
    return jax.tree_util.tree_map(lambda x: _put(x, sharding), tree,
                                  is_leaf=lambda x: x is None)


def shard_batch(x, mesh: Optional[Mesh], batch_axis: int = 0):
    """``x`` with axis ``batch_axis`` split over ``mesh`` (identity when mesh is None)."""
    if mesh is None:
        return x
    return _put(x, batch_sharding(mesh, batch_axis))


def jit_train(fn, mesh: Optional[Mesh] = None, batch_axis: int = 0):
    """``jax.jit`` of ``fn(state, data_x, data_y, idx, plan)`` (a train step, or a chunk
    of steps with ``idx`` [..., k, B]); the state is donated (its buffers are reused for
    the new state). On a mesh, axis ``batch_axis`` of ``idx`` is split over the devices
    and everything else is replicated."""
    if mesh is None:
        return jax.jit(fn, donate_argnums=(0,))
    r = replicated(mesh)
    return jax.jit(fn, donate_argnums=(0,),
                   in_shardings=(r, r, r, batch_sharding(mesh, batch_axis), r),
                   out_shardings=(r, r))


def jit_eval(eval_step, mesh: Optional[Mesh] = None, batch_size: int = 0):
    """``jax.jit`` of ``eval_step(variables, x[B], y[B], valid[B])``; on a mesh, when B
    splits evenly, the batch is split over the devices (inputs are moved there first)."""
    if mesh is None:
        return jax.jit(eval_step)
    if batch_size % mesh.size:  # uneven: one device, not the same batch on every one
        first = jax.sharding.SingleDeviceSharding(mesh.devices.flat[0])
        jitted = jax.jit(eval_step)

        def call_one(variables, x, y, valid):
            return jitted(*jax.tree_util.tree_map(lambda a: _put(a, first), (variables, x, y,
                                                                              valid)))
        return call_one
    r, b = replicated(mesh), batch_sharding(mesh, 0)
    jitted = jax.jit(eval_step, in_shardings=(r, b, b, b), out_shardings=(r, r))

    def call(variables, x, y, valid):
        return jitted(replicate(variables, mesh), shard_batch(x, mesh), shard_batch(y, mesh),
                      shard_batch(valid, mesh))
    return call


__all__ = ["DATA_AXIS", "TICKET_AXIS", "DistributedError", "slurm_tasks", "init_distributed",
           "is_primary", "sync", "ticket_devices", "ticket_mesh", "ticket_sharding",
           "put_tickets", "jit_over_tickets", "enable_compilation_cache", "split_cpu", "mesh_size", "data_mesh", "replicated", "batch_sharding",
           "replicate", "shard_batch", "jit_train", "jit_eval"]
