"""Orbax checkpoints of a run: atomic writes, restore against a template, run layout.

Layout of ``save_dir``::

    config.json             resolved configuration
    init/                   W0 (params, batch_stats); also wherever --init points
    checkpoints/<n>/        resume checkpoints, one per finished epoch (n = epochs done
                            in the run); the newest two are kept, the older one is only
                            deleted after the newer one is committed
    round_<r>/final/<e>/    the round's final ticket
    round_<r>/best/<e>/     the round's best-validation weights
    log.jsonl               one line per epoch
    summary.json / .csv     one row per round
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import pathlib
import shutil
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

# Orbax logs every save at INFO/WARNING; a run prints its own progress.
logging.getLogger("absl").setLevel(logging.ERROR)

LAYOUT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or from another run/layout."""


# --------------------------------------------------------------------------- orbax's event loops

def _run_until_all_done(coro):
    """Orbax's ``asyncio_utils._run_sync_via_new_loop``, closing the loop only once every
    task on it has finished.

    Orbax runs each save/restore in a fresh event loop and closes it as soon as the
    top-level ``asyncio.gather`` returns; when one read fails the gather returns at once
    while the other reads are still in flight in tensorstore. Their completion callbacks
    then call ``loop.call_soon_threadsafe`` on the closed loop from tensorstore's threads,
    each printing a ``RuntimeError: Event loop is closed`` traceback (at any time, often
    at exit), and their tasks log ``Task exception was never retrieved``. Waiting for the
    in-flight tasks (their errors collected, not raised), then one more turn of the loop
    so that the callbacks of tasks that failed just before it stopped (gather's, which
    mark their errors retrieved) run, removes both; a successful call has no task left.
    """
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        try:
            while True:
                pending = asyncio.all_tasks(loop)
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(asyncio.sleep(0))
                if not asyncio.all_tasks(loop):
                    break
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _install_loop_fix() -> None:
    from orbax.checkpoint._src import asyncio_utils
    if callable(getattr(asyncio_utils, "_run_sync_via_new_loop", None)):
        asyncio_utils._run_sync_via_new_loop = _run_until_all_done


_install_loop_fix()


def _abstract(tree):
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def _retree(template, restored):
    """Give ``restored`` the exact pytree types of ``template`` (orbax returns tuples/dicts)."""
    leaves = jax.tree_util.tree_leaves(restored)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)


def save(directory: str | os.PathLike, step: int, tree: Any, meta: Optional[dict] = None,
         keep: int = 1) -> None:
    """Write ``tree`` (arrays) and ``meta`` (JSON) as step ``step`` under ``directory``.

    Orbax writes into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` once
    complete (with ``commit_success.txt`` inside), so a killed process never leaves a
    half-written checkpoint that ``steps()`` counts. Older steps are deleted only after
    the new one is committed (the new step and the ``keep - 1`` newest others stay), each
    renamed out of the step namespace first, so a kill during a deletion cannot leave a
    half-deleted step either. A step that already exists (a run killed after writing it
    and resumed from an earlier checkpoint recomputes the same step) is replaced.
    """
    directory = pathlib.Path(directory).absolute()
    _remove_trash(directory)
    if (directory / str(step)).exists():
        _discard(directory / str(step))
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                           enable_async_checkpointing=False)
    with ocp.CheckpointManager(directory, options=options) as mgr:
        meta = dict(meta or {}, layout_version=LAYOUT_VERSION)
        mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                               meta=ocp.args.JsonSave(meta)), force=True)
        mgr.wait_until_finished()
    if not is_committed(directory / str(step)):
        raise CheckpointError(f"checkpoint {directory / str(step)} was not committed")
    others = [s for s in steps(directory) if s != step]  # newest last
    for old in others[:max(0, len(others) - (keep - 1))]:
        _discard(directory / str(old))


_TRASH_PREFIX = ".deleting-"


def _discard(path: pathlib.Path) -> None:
    """Delete a step directory: an atomic rename out of the step namespace, then rmtree."""
    trash = path.with_name(f"{_TRASH_PREFIX}{path.name}-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_trash(directory: pathlib.Path) -> None:
    """Finish deletions that a killed process left behind."""
    if directory.is_dir():
        for child in directory.iterdir():
            if child.name.startswith(_TRASH_PREFIX):
                shutil.rmtree(child, ignore_errors=True)


def is_committed(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete step: a plain number with ``meta`` and ``state``
    inside, committed (orbax writes ``commit_success.txt`` at commit; a step without
    orbax's ``_CHECKPOINT_METADATA`` comes from an older writer and counts as is)."""
    path = pathlib.Path(path)
    if not (path.name.isdigit() and path.is_dir() and (path / "meta").is_dir()
            and (path / "state").is_dir()):
        return False
    return (path / "commit_success.txt").exists() or not (path / "_CHECKPOINT_METADATA").exists()


def steps(directory: str | os.PathLike) -> list[int]:
    """Committed steps under ``directory`` (sorted); [] if none. Temporary
    (``*.orbax-checkpoint-tmp``), uncommitted and half-deleted directories never count."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(child.name) for child in directory.iterdir() if is_committed(child))


def latest_step(directory) -> Optional[int]:
    s = steps(directory)
    return s[-1] if s else None


def read_meta(directory, step: Optional[int] = None) -> dict:
    directory = pathlib.Path(directory)
    step = latest_step(directory) if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {directory}")
    path = directory / str(step) / "meta" / "metadata"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {directory / str(step)} is unreadable ({e}); "
                              f"delete it to fall back to the previous one") from None


def restore(directory, template: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """Restore (tree, meta) of ``step`` (default newest) with the structure of ``template``."""
    directory = pathlib.Path(directory).absolute()
    step = latest_step(directory) if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {directory}")
    meta = read_meta(directory, step)
    if meta.get("layout_version") != LAYOUT_VERSION:
        raise CheckpointError(f"checkpoint {directory / str(step)} has layout version "
                              f"{meta.get('layout_version')}, this rsst-jax reads {LAYOUT_VERSION}")
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    try:
        with ocp.CheckpointManager(directory, options=options) as mgr:
            restored = mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(template))))
    except Exception as e:  # orbax raises many types for corrupt/mismatched trees
        raise CheckpointError(f"cannot restore {directory / str(step)}: "
                              f"{e.__class__.__name__}: {str(e).splitlines()[0][:300]}") from None
    return _retree(template, restored.state), meta


def restore_raw(directory, step: Optional[int] = None) -> tuple[Any, dict]:
    """Restore (tree, meta) without a template, as nested dicts of numpy arrays."""
    directory = pathlib.Path(directory).absolute()
    step = latest_step(directory) if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {directory}")
    meta = read_meta(directory, step)
    ckptr = ocp.StandardCheckpointer()
    try:
        path = directory / str(step) / "state"
        # A target on this process's first device: a checkpoint written on another
        # device count (a mesh run, RSST_JAX_CPU_DEVICES) restores here too.
        on_one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        stored = ckptr.metadata(path).item_metadata.tree
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=on_one)
            if hasattr(m, "shape") else m, stored)
        tree = ckptr.restore(path, target)
    except Exception as e:
        raise CheckpointError(f"cannot restore {directory / str(step)}: "
                              f"{e.__class__.__name__}: {str(e).splitlines()[0][:300]}") from None
    return jax.tree_util.tree_map(np.asarray, tree), meta
