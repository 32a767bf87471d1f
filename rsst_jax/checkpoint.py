"""Orbax checkpoints of a run: atomic writes, verified restores, fallback to the last good one.

Where a run keeps its checkpoints (``init/``, ``checkpoints/<n>/``, ``round_<r>/final``
and ``round_<r>/best``) is ``rsst_jax.paths``'s to say. Each checkpoint directory is
written by one ``orbax.checkpoint.CheckpointManager``, held for the life of the process
(``_manager``): orbax writes a step into ``<n>.orbax-checkpoint-tmp`` and renames it to
``<n>`` once complete, keeps the newest ``keep`` steps (its ``LatestN`` policy; the step
just written counts as the newest), moves a step it drops into ``.deleting/`` (one
rename) before that folder is deleted, and removes what a killed process left in
temporary folders when a manager opens the directory. ``<n>.bad/`` is a step found
unusable on resume and set aside (never read nor deleted again). ``steps()`` is orbax's
own listing of the finished steps.

A step holds ``state/`` (orbax's OCDBT database of the arrays) and ``meta/metadata``
(JSON, with a crc32 of every array, written in the same atomic commit). Orbax reads only
the arrays a restore asks for, and nothing in OCDBT or zarr/zstd checksums the bytes (a
flipped byte inside a zstd block decodes to other numbers without an error), so every
restore here compares what it read with those crc32s.

A process about to end on a signal (``experiments.cli.ExitOnInterrupt``) calls
``finish_writes``: the checkpoint being written is committed first (within
``WRITE_GRACE_S``), and none starts after it.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import threading
import zlib
from typing import Any, Callable, Optional

import jax
import numpy as np

from rsst_jax import parallel

LAYOUT_VERSION = 1
# How long a process told to stop waits for the checkpoint it is writing: well inside
# SLURM's default KillWait (30 s between SIGTERM and SIGKILL).
WRITE_GRACE_S = 20.0


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or from another run/layout. ``reason`` is the
    short cause (no path), for messages that name the checkpoint themselves."""

    def __init__(self, message: str, reason: Optional[str] = None):
        super().__init__(message)
        self.reason = reason or message


# --------------------------------------------------------------------------- stopping

_WRITES = threading.RLock()
_DEPTH = threading.local()  # how deep in writing() this thread is
_STOPPING = threading.Event()
_NEVER = threading.Event()


@contextlib.contextmanager
def writing():
    """Around checkpoint writes that belong together (the best and the resume checkpoint
    of an epoch; every ``save`` holds it too): a process told to stop waits until the
    whole group is committed (``finish_writes``), and starts no group after that."""
    depth = getattr(_DEPTH, "n", 0)
    if depth == 0 and _STOPPING.is_set():
        _NEVER.wait()  # the process is ending: this write never starts
    with _WRITES:
        _DEPTH.n = depth + 1
        try:
            yield
        finally:
            _DEPTH.n = depth


def finish_writes(timeout: Optional[float] = None) -> bool:
    """For the thread that is about to end the process (never the one that writes): wait
    at most ``timeout`` seconds (default ``WRITE_GRACE_S``) for the checkpoint writes in
    flight to be committed, and keep any new one from starting (for good). True when
    nothing was left in flight; else the write goes on until the process ends, and since
    old steps are dropped only after a new one is committed, the previous step stays
    intact."""
    _STOPPING.set()
    return _WRITES.acquire(timeout=WRITE_GRACE_S if timeout is None else timeout)


# --------------------------------------------------------------------------- orbax's event loops

class _PatientLoop(asyncio.SelectorEventLoop):
    """An event loop that, when closed, first lets every task on it finish.

    Orbax runs each save/restore in a fresh event loop and closes it as soon as the
    top-level ``asyncio.gather`` returns; when one read of a damaged checkpoint fails the
    gather returns at once while the other reads are still in flight in tensorstore.
    Their completion callbacks then call ``loop.call_soon_threadsafe`` on the closed loop
    from tensorstore's threads, each printing a ``RuntimeError: Event loop is closed``
    traceback (at any time, often at exit), and their tasks log ``Task exception was
    never retrieved``. Waiting for the in-flight tasks (their errors collected, not
    raised), then one more turn of the loop so that the callbacks of tasks that failed
    just before it stopped (gather's, which mark their errors retrieved) run, removes
    both; a successful call has no task left. ``closed`` counts the loops closed so (a
    test checks that orbax's calls still get their loops from asyncio's policy)."""

    closed = 0

    def close(self) -> None:
        if not self.is_closed() and not self.is_running():
            _PatientLoop.closed += 1
            while True:
                pending = asyncio.all_tasks(self)
                if pending:
                    self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self.run_until_complete(asyncio.sleep(0))
                if not asyncio.all_tasks(self):
                    break
        super().close()


class _PatientPolicy(asyncio.DefaultEventLoopPolicy):
    """asyncio's default policy, whose new loops are :class:`_PatientLoop` s."""

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _PatientLoop()


def _orbax():
    """``orbax.checkpoint``, imported at the first checkpoint read or written; its import
    adds a handler to the root logger, which is taken off again (``import rsst_jax``
    leaves logging as it was)."""
    root = logging.getLogger()
    before = list(root.handlers)
    import orbax.checkpoint as ocp  # order: adds a root logger handler, taken off below
    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)
    return ocp


_QUIET = threading.local()


@contextlib.contextmanager
def _orbax_quietly():
    """Around every orbax call here: the loops orbax makes with ``asyncio.new_event_loop``
    are :class:`_PatientLoop` s (asyncio's public policy hook, set for the call only; no
    part of orbax is replaced), and its INFO/WARNING logging of every save is silenced
    for the call only (a run prints its own progress; ``import rsst_jax`` changes no
    logger)."""
    if getattr(_QUIET, "depth", 0):  # already inside
        yield
        return
    _QUIET.depth = 1
    policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_PatientPolicy())
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
        asyncio.set_event_loop_policy(policy)
        _QUIET.depth = 0


# --------------------------------------------------------------------------- arrays by name

def _leaf_name(path) -> str:
    """'state/params/conv1/kernel': the same for a template (dataclass fields, tuples) and
    for orbax's own view of the stored tree (nested dicts)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _named_arrays(tree) -> dict[str, Any]:
    """{name: leaf} for the leaves that have a shape and a dtype."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_leaf_name(p): x for p, x in flat if hasattr(x, "shape") and hasattr(x, "dtype")}


def checksums(tree) -> dict[str, int]:
    """{leaf name: crc32 of its bytes in C order}: what ``save`` writes into the meta of a
    step. Arrays this process cannot see whole (multi-host shards) have none."""
    named = {k: _local(v) for k, v in _named_arrays(tree).items()}
    named = {k: v for k, v in named.items()
             if not isinstance(v, jax.Array) or v.is_fully_addressable}
    host = jax.device_get(named)  # one batch of transfers, not one per leaf
    return {k: zlib.crc32(np.ascontiguousarray(v).reshape(-1).view(np.uint8))
            for k, v in host.items()}


def _local(x):
    """This process's copy of an array replicated over several processes (else ``x``)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and x.is_fully_replicated:
        return x.addressable_data(0)
    return x


def _global(tree):
    """Several processes: every array of ``tree`` (each process holds the same values)
    as one array replicated over all of their devices, as orbax saves them."""
    if jax.process_count() == 1:
        return tree
    return parallel.replicate(tree, parallel.data_mesh())


def _short(e: BaseException, within: Optional[pathlib.Path] = None) -> str:
    """The first line of an exception, at most 160 characters, paths under ``within``
    relative to it (orbax's messages run to pages; the tensorstore error one wraps says
    more than its own first line; a tensorstore status code needs no class name)."""
    while "See full TensorStore details" in str(e) and e.__cause__ is not None:
        e = e.__cause__
    lines = str(e).strip().splitlines()
    text = lines[0].split(". See full TensorStore details")[0] if lines else ""
    if within is not None:
        text = text.replace(f"{within}{os.sep}", "").replace(str(within), ".")
    if not re.match(r"[A-Z_]{4,}: ", text):
        text = f"{e.__class__.__name__}: {text}" if text else e.__class__.__name__
    return text if len(text) <= 160 else text[:157] + "..."


# --------------------------------------------------------------------------- writing

_TRASH = ".deleting"  # orbax's todelete_subdir: where a dropped step is renamed to
_BAD_SUFFIX = ".bad"
_MANAGERS: "collections.OrderedDict[pathlib.Path, tuple[int, Any]]" = collections.OrderedDict()
_MAX_MANAGERS = 8  # a run writes a few directories at a time; older rounds' are closed


def _manager(directory: pathlib.Path, keep: int):
    """This process's ``CheckpointManager`` of ``directory``, keeping ``keep`` steps
    (opened at the first save there, held until ``close_managers``)."""
    held = _MANAGERS.pop(directory, None)
    if held is not None and held[0] == keep:
        _MANAGERS[directory] = held
        return held[1]
    if held is not None:
        held[1].close()
    ocp = _orbax()
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(n=keep), create=True,
        cleanup_tmp_directories=True, todelete_subdir=_TRASH,
        enable_async_checkpointing=False)
    mgr = ocp.CheckpointManager(directory, options=options)
    _MANAGERS[directory] = (keep, mgr)
    while len(_MANAGERS) > _MAX_MANAGERS:
        _MANAGERS.popitem(last=False)[1][1].close()
    return mgr


def close_managers() -> None:
    """Close every manager this process holds (the next save opens one again)."""
    with _orbax_quietly():
        while _MANAGERS:
            _MANAGERS.popitem()[1][1].close()


def _forget(directory: pathlib.Path) -> None:
    held = _MANAGERS.pop(directory, None)
    if held is not None:
        with _orbax_quietly():
            held[1].close()


def save(directory: str | os.PathLike, step: int, tree: Any, meta: Optional[dict] = None,
         keep: int = 1) -> None:
    """Write ``tree`` (arrays) and ``meta`` (JSON) as step ``step`` under ``directory``,
    keeping the newest ``keep`` steps (the new one and the ``keep - 1`` newest others).

    Orbax commits the step atomically (a killed process never leaves a half-written step
    that ``steps()`` counts) and drops older steps only after that, each renamed out of
    the step namespace first. A step that already exists (a run killed after writing it
    and resumed from an earlier checkpoint recomputes the same step) is replaced. The
    meta also records a crc32 of every array, checked by every restore. Set-aside steps
    (``<n>.bad``) are never touched. A process told to stop (``finish_writes``) lets a
    save in flight finish and starts none after it.
    """
    directory = pathlib.Path(directory).absolute()
    meta = dict(meta or {}, layout_version=LAYOUT_VERSION, checksums=checksums(tree))
    tree = _global(tree)
    ocp = _orbax()
    with writing(), _orbax_quietly():
        primary = parallel.is_primary()  # several processes: process 0 tidies, all write
        if primary:
            shutil.rmtree(directory / _TRASH, ignore_errors=True)  # a killed deletion
        mgr = _manager(directory, keep)
        if step in mgr.all_steps():
            mgr.delete(step)
        # force: also a step below the newest (a resumed run's, or another round's best)
        mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                               meta=ocp.args.JsonSave(meta)), force=True)
        mgr.wait_until_finished()
        if step not in mgr.all_steps() or not (directory / str(step)).is_dir():
            raise CheckpointError(f"checkpoint {directory / str(step)} was not committed")
        if primary:
            shutil.rmtree(directory / _TRASH, ignore_errors=True)
        parallel.sync(f"rsst_jax saved {directory} {step}")


def set_aside(path: str | os.PathLike) -> pathlib.Path:
    """Rename step directory ``path`` (``.../7``) to ``.../7.bad`` (``.../bad-7-<n>`` if
    that is taken): out of the step namespace, so nothing reads, counts or deletes it
    again; its files stay as they are. Returns the new path."""
    path = pathlib.Path(path)
    target, n = path.with_name(path.name + _BAD_SUFFIX), 1
    while target.exists():
        target, n = path.with_name(f"bad-{path.name}-{n}"), n + 1
    os.rename(path, target)
    _forget(path.parent.absolute())  # a manager held there lists the step no more
    return target


# --------------------------------------------------------------------------- finding steps

def steps(directory: str | os.PathLike) -> list[int]:
    """The finished steps under ``directory`` (sorted), as orbax lists them; [] if none.
    Temporary (``*.orbax-checkpoint-tmp``), dropped (``.deleting/``) and set-aside
    (``<n>.bad``) directories never count."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    with _orbax_quietly():
        found = _orbax().path.step.standard_name_format().find_all(directory)
        return sorted(m.step for m in found)


def latest_step(directory) -> Optional[int]:
    s = steps(directory)
    return s[-1] if s else None


# --------------------------------------------------------------------------- reading

def _read_meta_file(path: pathlib.Path) -> dict:
    """The meta of step directory ``path`` as saved (checksums included)."""
    try:
        meta = json.loads((path / "meta" / "metadata").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no meta/metadata",
                              "no meta/metadata") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable (meta/metadata: {_short(e)})",
                              f"meta/metadata: {_short(e)}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} is unreadable (meta/metadata is not a dict)",
                              "meta/metadata is not a dict")
    return meta


def _public(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "checksums"}


def read_meta(directory, step: Optional[int] = None) -> dict:
    """The meta saved with ``step`` (default newest), plus ``layout_version``."""
    directory = pathlib.Path(directory)
    step = latest_step(directory) if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {directory}")
    return _public(_read_meta_file(directory / str(step)))


def _problem_with_files(path: pathlib.Path) -> Optional[str]:
    """What is missing or unreadable in step directory ``path`` besides the arrays."""
    if not path.is_dir():
        return "not a directory"
    for sub in ("state", "meta"):
        if not (path / sub).is_dir():
            return f"no {sub}/ directory"
    marker = path / "_CHECKPOINT_METADATA"
    if (path / "commit_success.txt").exists():  # this orbax writes the marker before that
        try:
            json.loads(marker.read_text())
        except FileNotFoundError:
            return "no _CHECKPOINT_METADATA"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"_CHECKPOINT_METADATA: {_short(e)}"
    return None


def _layout_problem(template: dict[str, Any], stored: dict[str, Any], dtypes: bool
                    ) -> Optional[str]:
    """How the arrays in a checkpoint differ from a template's, or None."""
    missing = [k for k in template if k not in stored]
    extra = [k for k in stored if k not in template]
    more = lambda names: f" (and {len(names) - 1} more)" if len(names) > 1 else ""  # noqa: E731
    if missing:
        return f"no array {missing[0]}{more(missing)} in the checkpoint"
    if extra:
        return f"array {extra[0]}{more(extra)} in the checkpoint is not in the run's state"
    for k, t in template.items():
        s = stored[k]
        if tuple(s.shape) != tuple(t.shape) or (dtypes and np.dtype(s.dtype) != np.dtype(t.dtype)):
            return (f"{k} is {tuple(s.shape)} {np.dtype(s.dtype)} in the checkpoint, "
                    f"{tuple(t.shape)} {np.dtype(t.dtype)} expected")
    return None


def _load(path: pathlib.Path, template: Any = None, *, exact_dtypes: bool = False
          ) -> tuple[Any, dict]:
    """(tree, meta as saved) of step directory ``path``, verified; raises CheckpointError
    (one line, ``reason`` set) on anything missing, unreadable, of another layout, unlike
    ``template`` (names, shapes; dtypes too with ``exact_dtypes``) or not matching its
    checksums. Without a template the tree is nested dicts on this process's first device."""
    def fail(reason: str):
        raise CheckpointError(f"cannot restore {path}: {reason}", reason)

    problem = _problem_with_files(path)
    if problem:
        fail(problem)
    try:
        meta = _read_meta_file(path)
    except CheckpointError as e:
        fail(e.reason)
    if meta.get("layout_version") != LAYOUT_VERSION:
        fail(f"layout version {meta.get('layout_version')}, this rsst-jax reads {LAYOUT_VERSION}")
    with _orbax_quietly():
        tree, stored = _read_arrays(path, template, exact_dtypes, fail)
    sums = meta.get("checksums") or {}  # none in checkpoints from before checksums
    # A leaf cast to the template's dtype (``restore`` allows it) cannot be compared.
    read = {k: v for k, v in _named_arrays(tree).items()
            if k in sums and k in stored and np.dtype(v.dtype) == np.dtype(stored[k].dtype)}
    for name, crc in checksums(read).items():
        if crc != sums[name]:
            fail(f"the data of {name} does not match its checksum")
    if template is not None:
        tree = _retree(template, tree)
    return tree, meta


def _read_arrays(path: pathlib.Path, template, exact_dtypes: bool, fail):
    """(tree, {name: stored array metadata}) of ``path/state`` against ``template``."""
    ocp = _orbax()
    handler = ocp.StandardCheckpointHandler()
    try:
        try:
            stored_tree = handler.metadata(path / "state").tree
        except Exception as e:  # noqa: BLE001  orbax raises many types for a damaged tree
            fail(f"cannot read its array metadata: {_short(e, path)}")
        stored = _named_arrays(stored_tree)
        if template is not None:
            problem = _layout_problem(_named_arrays(template), stored, exact_dtypes)
            if problem:
                fail(problem)
            target = _abstract(template)
        else:
            # A target on this process's first device: a checkpoint written on another
            # device count (a mesh run, RSST_JAX_CPU_DEVICES) restores here too.
            on_one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            target = jax.tree_util.tree_map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=on_one)
                if hasattr(m, "shape") else m, stored_tree)
        if jax.process_count() > 1:  # every process reads the whole of every array
            everywhere = parallel.replicated(parallel.data_mesh())
            target = jax.tree_util.tree_map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=everywhere)
                if hasattr(m, "shape") else m, target)
        try:
            tree = handler.restore(path / "state", args=ocp.args.StandardRestore(target))
        except Exception as e:  # noqa: BLE001
            fail(f"cannot read its arrays: {_short(e, path)}")
        tree = jax.tree_util.tree_map(_local, tree)
    finally:
        handler.close()
    return tree, stored


def _abstract(tree):
    return jax.tree_util.tree_map(_orbax().utils.to_shape_dtype_struct, tree)


def _retree(template, restored):
    """Give ``restored`` the exact pytree types of ``template`` (orbax returns tuples/dicts)."""
    leaves = jax.tree_util.tree_leaves(restored)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)


def restore(directory, template: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """Restore (tree, meta) of ``step`` (default newest) with the structure of ``template``
    (a leaf whose dtype differs from the stored one is cast to the template's)."""
    directory = pathlib.Path(directory).absolute()
    step = latest_step(directory) if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {directory}")
    tree, meta = _load(directory / str(step), template)
    return tree, _public(meta)


def restore_raw(directory, step: Optional[int] = None) -> tuple[Any, dict]:
    """Restore (tree, meta) without a template, as nested dicts of numpy arrays."""
    directory = pathlib.Path(directory).absolute()
    step = latest_step(directory) if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {directory}")
    tree, meta = _load(directory / str(step))
    return jax.tree_util.tree_map(np.asarray, tree), _public(meta)


def restore_newest_good(directory, template: Any, *,
                        check: Optional[Callable[[Any, dict], Optional[str]]] = None,
                        log: Optional[Callable[[str], None]] = None) -> tuple[Any, dict, int]:
    """(tree, meta, step) of the newest step under ``directory`` that restores, newest first.

    A step is unusable when a file is missing or unreadable, its layout version is
    another, its arrays differ from ``template`` in name, shape or dtype, its data does
    not match the checksums written at save, or ``check(tree, meta)`` returns a reason
    (a short string; None when the step is fine). An unusable step is set aside
    (``set_aside``: renamed to ``<step>.bad``, nothing deleted) with one line to ``log``
    (default: stderr), and the one before it is tried. Raises CheckpointError (one line
    naming every step tried) when none is usable, or there is none.
    """
    directory = pathlib.Path(directory).absolute()
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    candidates = sorted(steps(directory), reverse=True)
    if not candidates:
        raise CheckpointError(f"no checkpoint in {directory}")
    tried = []
    for i, step in enumerate(candidates):
        path = directory / str(step)
        try:
            tree, meta = _load(path, template, exact_dtypes=True)
            reason = check(tree, _public(meta)) if check is not None else None
        except CheckpointError as e:
            reason = e.reason
        if not reason:
            return tree, _public(meta), step
        try:
            where = f"set aside as {set_aside(path)}"
        except OSError as e:
            where = f"could not set it aside ({_short(e)})"
        then = ", trying the previous one" if i + 1 < len(candidates) else ""
        log(f"checkpoint {path} is unusable ({reason}); {where}{then}")
        tried.append(f"{step} ({reason})")
    raise CheckpointError(
        f"no usable checkpoint in {directory}: tried {'; '.join(tried)}; each is set aside as "
        f"<step>{_BAD_SUFFIX}. Start again without --resume in a new --save_dir, or put a good "
        f"copy of a checkpoint back under {directory}")
