"""Orbax checkpoints of a run: atomic writes, verified restores, fallback to the last good one.

Where a run keeps its checkpoints (``init/``, ``checkpoints/<n>/``, ``round_<r>/final``
and ``round_<r>/best``) is ``rsst_jax.paths``'s to say. Under a checkpoint directory,
``<n>/`` is a committed step; ``save`` keeps the newest ``keep`` of them, deleting an older
one only after the newer one is committed; ``<n>.bad/`` is a step found unusable on
resume and set aside (never read nor deleted again).

A step holds ``state/`` (orbax's OCDBT database of the arrays) and ``meta/metadata``
(JSON, with a crc32 of every array, written in the same atomic commit). Orbax reads only
the arrays a restore asks for, and nothing in OCDBT or zarr/zstd checksums the bytes (a
flipped byte inside a zstd block decodes to other numbers without an error), so every
restore here compares what it read with those crc32s.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import zlib
from typing import Any, Callable, Optional

import jax
import numpy as np

from rsst_jax import parallel

LAYOUT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or from another run/layout. ``reason`` is the
    short cause (no path), for messages that name the checkpoint themselves."""

    def __init__(self, message: str, reason: Optional[str] = None):
        super().__init__(message)
        self.reason = reason or message


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


def _orbax():
    """``orbax.checkpoint``, imported at the first checkpoint read or written; its import
    adds a handler to the root logger, which is taken off again (``import rsst_jax``
    leaves logging as it was)."""
    root = logging.getLogger()
    before = list(root.handlers)
    import orbax.checkpoint as ocp
    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)
    return ocp


def _install_loop_fix() -> None:
    from orbax.checkpoint._src import asyncio_utils
    if callable(getattr(asyncio_utils, "_run_sync_via_new_loop", None)):
        asyncio_utils._run_sync_via_new_loop = _run_until_all_done


@contextlib.contextmanager
def _orbax_quietly():
    """Around every orbax call here: orbax's event loops closed only when done (see
    ``_run_until_all_done``; installed at the first checkpoint read or written, not at
    import) and its INFO/WARNING logging of every save silenced for the call only (a run
    prints its own progress; ``import rsst_jax`` changes no logger)."""
    _install_loop_fix()
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


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

def save(directory: str | os.PathLike, step: int, tree: Any, meta: Optional[dict] = None,
         keep: int = 1) -> None:
    """Write ``tree`` (arrays) and ``meta`` (JSON) as step ``step`` under ``directory``.

    Orbax writes into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` once
    complete (with ``commit_success.txt`` inside), so a killed process never leaves a
    half-written checkpoint that ``steps()`` counts. Older steps are deleted only after
    the new one is committed (the new step and the ``keep - 1`` newest others stay), each
    renamed out of the step namespace first, so a kill during a deletion cannot leave a
    half-deleted step either. A step that already exists (a run killed after writing it
    and resumed from an earlier checkpoint recomputes the same step) is replaced. The
    meta also records a crc32 of every array, checked by every restore. Set-aside steps
    (``<n>.bad``) are never touched.
    """
    directory = pathlib.Path(directory).absolute()
    primary = parallel.is_primary()  # several processes: process 0 tidies, all write
    if primary:
        _remove_trash(directory)
        if (directory / str(step)).exists():
            _discard(directory / str(step))
    parallel.sync(f"rsst_jax save {directory} {step}")
    ocp = _orbax()
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                           enable_async_checkpointing=False)
    meta = dict(meta or {}, layout_version=LAYOUT_VERSION, checksums=checksums(tree))
    with _orbax_quietly(), ocp.CheckpointManager(directory, options=options) as mgr:
        mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_global(tree)),
                                               meta=ocp.args.JsonSave(meta)), force=True)
        mgr.wait_until_finished()
    if not is_committed(directory / str(step)):
        raise CheckpointError(f"checkpoint {directory / str(step)} was not committed")
    others = [s for s in steps(directory) if s != step]  # newest last
    if primary:
        for old in others[:max(0, len(others) - (keep - 1))]:
            _discard(directory / str(old))
    parallel.sync(f"rsst_jax saved {directory} {step}")



_TRASH_PREFIX = ".deleting-"
_BAD_SUFFIX = ".bad"


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


def set_aside(path: str | os.PathLike) -> pathlib.Path:
    """Rename step directory ``path`` (``.../7``) to ``.../7.bad`` (``.../bad-7-<n>`` if
    that is taken): out of the step namespace, so nothing reads, counts or deletes it
    again; its files stay as they are. Returns the new path."""
    path = pathlib.Path(path)
    target, n = path.with_name(path.name + _BAD_SUFFIX), 1
    while target.exists():
        target, n = path.with_name(f"bad-{path.name}-{n}"), n + 1
    os.rename(path, target)
    return target


# --------------------------------------------------------------------------- finding steps

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
    (``*.orbax-checkpoint-tmp``), uncommitted, half-deleted and set-aside directories
    never count."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(child.name) for child in directory.iterdir() if is_committed(child))


def latest_step(directory) -> Optional[int]:
    s = steps(directory)
    return s[-1] if s else None


def _damaged_steps(directory: pathlib.Path) -> list[int]:
    """Steps orbax committed (``commit_success.txt``) that lost ``meta/`` or ``state/``
    since: ``steps()`` skips them, a resume sets them aside."""
    if not directory.is_dir():
        return []
    return [int(c.name) for c in directory.iterdir()
            if c.name.isdigit() and (c / "commit_success.txt").is_file() and not is_committed(c)]


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
    (default: stderr), and the one before it is tried. Committed steps that lost
    ``meta/`` or ``state/`` are set aside the same way. Raises CheckpointError (one line
    naming every step tried) when none is usable, or there is none.
    """
    directory = pathlib.Path(directory).absolute()
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    candidates = sorted(set(steps(directory)) | set(_damaged_steps(directory)), reverse=True)
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
