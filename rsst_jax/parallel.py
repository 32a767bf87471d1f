"""Data parallelism over a ``jax.sharding.Mesh``, and the compiled train step and chunk.

One mesh axis, ``data``: the batch axis of every batch is split over it; parameters,
optimizer state, masks, RSST targets and the training images are replicated. ``jit``
sees global arrays, so BatchNorm's batch mean and variance inside the step are over the
global batch (XLA inserts the all-reduce), exactly as on one device. No ``pmap``.

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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
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
    if mesh is None:
        return tree
    sharding = replicated(mesh)
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


__all__ = ["DATA_AXIS", "enable_compilation_cache", "split_cpu", "mesh_size", "data_mesh", "replicated", "batch_sharding",
           "replicate", "shard_batch", "jit_train", "jit_eval"]
