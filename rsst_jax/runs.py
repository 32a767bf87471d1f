"""Read what ``python -m experiments.run`` writes: run directories and their checkpoints.

A run directory (``--save_dir``) holds ``config.json``, ``log.jsonl`` (one JSON object
per epoch), ``summary.json`` (one row per round) and orbax checkpoints (layout in
``rsst_jax.checkpoint``). ``load_run`` checks that a directory is one and returns its
contents; ``resolve_checkpoint``/``load_checkpoint`` find and open a checkpoint given a
run, a round folder, a checkpoint folder or one step of it.

Reading summaries and logs needs no JAX; only ``load_checkpoint`` imports orbax.
Errors are ``RunDirError`` with a one-line message saying what was expected.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from typing import Any, Optional

CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_KINDS = ("final", "best")
_ROUND_DIR = re.compile(r"^round_(\d+)$")
# Columns every summary row of this layout has; a row without them is another layout.
_REQUIRED_SUMMARY = ("round", "remaining_weight_pct", "channel_sparsity_pct", "final_test_acc")


class RunDirError(ValueError):
    """A path that is not a readable run or checkpoint; the message says what was expected."""


# --------------------------------------------------------------------------- runs


def is_run_dir(path: str | pathlib.Path) -> bool:
    """True when ``path`` looks like a ``--save_dir`` (summary, log or config file present)."""
    p = pathlib.Path(path)
    return p.is_dir() and any((p / f).is_file() for f in (SUMMARY_FILE, LOG_FILE, CONFIG_FILE))


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON (line {e.lineno}): the file is damaged") from None
    except OSError as e:
        raise RunDirError(f"cannot read {path}: {e.strerror}") from None


def read_log(path: str | pathlib.Path) -> list[dict]:
    """Rows of ``log.jsonl``; a torn last line (run killed mid-write) is dropped.
    Epochs count from 1 (a log written by rsst-jax 0.1, which counted from 0, is shifted)."""
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise RunDirError(f"{path} line {i + 1} is not valid JSON: the file is damaged") from None
        if not isinstance(row, dict) or "round" not in row or "epoch" not in row:
            raise RunDirError(f"{path} line {i + 1} has no round/epoch: not an rsst-jax epoch log")
        rows.append(row)
    if rows and min(r["epoch"] for r in rows) == 0:
        rows = [dict(r, epoch=r["epoch"] + 1) for r in rows]
    return rows


@dataclasses.dataclass
class Run:
    """One run directory: resolved flags, per-round summary rows and per-epoch log rows."""

    path: pathlib.Path
    config: dict
    summary: list[dict]
    log: list[dict]

    @property
    def name(self) -> str:
        return self.path.name

    # ---------------------------------------------------------------- description
    @property
    def struct(self) -> str:
        return str(self.config.get("struct", "?"))

    @property
    def method(self) -> str:
        """IMP, Refill, Refill+, RSST, or the baseline prune method, plus a non-default scope."""
        c = self.config
        if self.struct == "rsst":
            name = "RSST"
        elif self.struct == "refill":
            name = "Refill+" if float(c.get("fillback_rate") or 0) > 0 else "Refill"
        elif c.get("prune_method") == "filter":
            name = "filter"
        elif c.get("prune_method") == "random":
            name = "random"
        elif self.struct == "none":
            name = "IMP"
        else:
            name = "?"
        if c.get("prune_scope") == "layerwise" or c.get("layer_rates"):
            name += " (layerwise)"
        return name

    @property
    def criteria(self) -> str:
        return str(self.config.get("criteria", "?")) if self.struct in ("refill", "rsst") else "-"

    @property
    def schedule(self) -> str:
        if self.struct != "rsst":
            return "-"
        text = str(self.config.get("RST_schedule", "?"))
        if text == "exp_custom_exponents":
            text += f"={self.config['exponents']:g}" if "exponents" in self.config else ""
        if self.config.get("reg_adaptive"):
            text += " adaptive"
        return text

    @property
    def rounds_planned(self) -> Optional[int]:
        value = self.config.get("pruning_times")
        return int(value) if value is not None else None

    @property
    def rounds_done(self) -> int:
        return len(self.summary)

    @property
    def complete(self) -> bool:
        return self.rounds_planned is not None and self.rounds_done >= self.rounds_planned

    def epochs(self, round_idx: int) -> list[dict]:
        """Log rows of one round, in epoch order."""
        return sorted((r for r in self.log if r.get("round") == round_idx), key=lambda r: r["epoch"])

    # ---------------------------------------------------------------- checkpoints
    def checkpoints(self) -> list["CheckpointRef"]:
        """Every round checkpoint (final and best), ordered by round then kind."""
        return list_checkpoints(self.path)


def _existing_dir(path, expected: str) -> pathlib.Path:
    """``path`` as a Path; RunDirError when it is missing or a file."""
    p = pathlib.Path(path)
    if not p.exists():
        raise RunDirError(f"{p}: no such directory")
    if not p.is_dir():
        raise RunDirError(f"{p} is a file; expected {expected}")
    return p


def load_run(path: str | pathlib.Path, *, need_summary: bool = True) -> Run:
    """Read a run directory; ``need_summary`` requires at least one finished round.

    Raises ``RunDirError`` when ``path`` is not a run directory, a file is damaged or
    the summary is from another layout.
    """
    p = _existing_dir(path, "a run directory (the --save_dir of python -m experiments.run)")
    if not is_run_dir(p):
        raise RunDirError(f"{p} is not an rsst-jax run directory: it has no {SUMMARY_FILE}, "
                          f"{LOG_FILE} or {CONFIG_FILE} (expected the --save_dir of "
                          f"python -m experiments.run)")
    config = _read_json(p / CONFIG_FILE) if (p / CONFIG_FILE).is_file() else {}
    if not isinstance(config, dict):
        raise RunDirError(f"{p / CONFIG_FILE} is not a mapping of flags: not an rsst-jax config")
    summary = _read_json(p / SUMMARY_FILE) if (p / SUMMARY_FILE).is_file() else []
    if not isinstance(summary, list) or not all(isinstance(r, dict) for r in summary):
        raise RunDirError(f"{p / SUMMARY_FILE} is not a list of round rows: written by another "
                          f"tool or an older layout")
    for row in summary:
        missing = [k for k in _REQUIRED_SUMMARY if k not in row]
        if missing:
            raise RunDirError(f"{p / SUMMARY_FILE} comes from an older layout: its rows lack "
                              f"{', '.join(missing)}; re-run with this version of rsst-jax")
    if need_summary and not summary:
        raise RunDirError(f"{p} has no finished round yet ({SUMMARY_FILE} is missing or empty); "
                          f"wait for round 0 to finish or resume it with --resume")
    summary = sorted(summary, key=lambda r: r["round"])
    return Run(path=p, config=config, summary=summary, log=read_log(p / LOG_FILE))


def find_runs(paths: list[str | pathlib.Path]) -> list[pathlib.Path]:
    """Run directories among ``paths``; a path that is not one contributes its run subfolders
    (so a sweep's output folder stands for all its cells). Order: as given, then sorted."""
    out = []
    for path in paths:
        p = pathlib.Path(path)
        if is_run_dir(p) or not p.is_dir():
            out.append(p)
            continue
        children = sorted(c for c in p.iterdir() if is_run_dir(c))
        out.extend(children or [p])  # load_run(p) then explains what is wrong
    return out


def summary_value(row: dict, key: str) -> Optional[float]:
    """A numeric summary value, or None when absent or not finite."""
    value = row.get(key)
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------- checkpoints


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint step: ``directory/step`` written by ``rsst_jax.checkpoint.save``.

    ``kind`` is 'final', 'best', 'init', 'resume' or 'checkpoint' (a folder elsewhere);
    ``round`` is None where the path does not say it.
    """

    directory: pathlib.Path
    step: int
    kind: str
    round: Optional[int] = None

    @property
    def path(self) -> pathlib.Path:
        return self.directory / str(self.step)

    @property
    def run_dir(self) -> Optional[pathlib.Path]:
        """The run directory this checkpoint belongs to, if it lies inside one."""
        for parent in (self.directory.parent, self.directory.parent.parent):
            if is_run_dir(parent):
                return parent
        return None


def _step_dirs(directory: pathlib.Path) -> list[pathlib.Path]:
    if not directory.is_dir():
        return []
    return sorted((c for c in directory.iterdir() if c.is_dir() and c.name.isdigit()),
                  key=lambda c: int(c.name))


def _is_step_dir(p: pathlib.Path) -> bool:
    return p.is_dir() and p.name.isdigit() and (p / "state").is_dir()


def _older_layout(p: pathlib.Path) -> RunDirError:
    return RunDirError(f"{p} is a checkpoint from an older or foreign layout (no meta/ next to "
                       f"state/); this rsst-jax reads checkpoints written by "
                       f"python -m experiments.run (layout version 1)")


def _ref_for_manager(directory: pathlib.Path, step: Optional[int] = None) -> CheckpointRef:
    steps = _step_dirs(directory)
    committed = [int(s.name) for s in steps if (s / "meta").is_dir() and (s / "state").is_dir()]
    if not committed:
        if steps:
            raise _older_layout(steps[-1])
        raise RunDirError(f"{directory} holds no checkpoint (no numbered step folder)")
    if step is None:
        step = committed[-1]
    elif step not in committed:
        raise RunDirError(f"{directory} has no step {step}; it has {committed}")
    kind, round_idx = "checkpoint", None
    m = _ROUND_DIR.match(directory.parent.name)
    if m and directory.name in CHECKPOINT_KINDS:
        kind, round_idx = directory.name, int(m.group(1))
    elif directory.name == "init":
        kind = "init"
    elif directory.name == "checkpoints":
        kind = "resume"
    return CheckpointRef(directory=directory, step=step, kind=kind, round=round_idx)


def list_checkpoints(run_dir: str | pathlib.Path) -> list[CheckpointRef]:
    """Round checkpoints of a run (``round_<r>/final`` and ``round_<r>/best``), newest step each."""
    run_dir = pathlib.Path(run_dir)
    refs = []
    rounds = sorted((int(m.group(1)), c) for c in run_dir.iterdir() if c.is_dir()
                    for m in [_ROUND_DIR.match(c.name)] if m) if run_dir.is_dir() else []
    for _, rdir in rounds:
        for kind in CHECKPOINT_KINDS:
            if (rdir / kind).is_dir() and _step_dirs(rdir / kind):
                refs.append(_ref_for_manager(rdir / kind))
    return refs


def resolve_checkpoint(path: str | pathlib.Path, *, round_idx: Optional[int] = None,
                       kind: str = "final") -> CheckpointRef:
    """The checkpoint that ``path`` names.

    ``path`` may be a run directory (default: the last round with a ``kind`` checkpoint,
    or round ``round_idx``), a ``round_<r>`` folder, a checkpoint folder
    (``round_<r>/final``, ``init``, ``checkpoints``) or one step of it (``.../final/3``).
    """
    if kind not in CHECKPOINT_KINDS:
        raise RunDirError(f"checkpoint kind must be one of {CHECKPOINT_KINDS}, got {kind!r}")
    p = _existing_dir(path, "an orbax checkpoint directory or a run directory")
    if _is_step_dir(p):
        if not (p / "meta").is_dir():
            raise _older_layout(p)
        return _ref_for_manager(p.parent, int(p.name))
    if _step_dirs(p):
        return _ref_for_manager(p)
    m = _ROUND_DIR.match(p.name)
    if m:
        if not (p / kind).is_dir():
            raise RunDirError(f"{p} has no {kind}/ checkpoint (the round has not finished?)")
        return _ref_for_manager(p / kind)
    if is_run_dir(p) or any(_ROUND_DIR.match(c.name) for c in p.iterdir()):
        refs = [r for r in list_checkpoints(p) if r.kind == kind]
        if round_idx is not None:
            refs = [r for r in refs if r.round == round_idx]
            if not refs:
                raise RunDirError(f"{p} has no {kind} checkpoint of round {round_idx}")
        if refs:
            return refs[-1]
        if (p / "init").is_dir() and _step_dirs(p / "init"):
            return _ref_for_manager(p / "init")
        raise RunDirError(f"{p} is a run directory without checkpoints yet")
    if any(c.suffix in (".msgpack", ".pt", ".pth", ".pkl") for c in p.iterdir() if c.is_file()):
        raise _older_layout(p)
    raise RunDirError(f"{p} is neither an rsst-jax run directory nor an orbax checkpoint "
                      f"(expected --save_dir, round_<r>/final or a numbered step folder)")


def load_checkpoint(ref: CheckpointRef | str | pathlib.Path) -> tuple[dict, dict, CheckpointRef]:
    """(tree, meta, ref): the checkpoint's arrays as nested dicts of numpy arrays.

    The tree of a round checkpoint is ``{'params', 'batch_stats', 'masks'}``; a resume
    checkpoint's is flattened to the same keys (from its training state). Checks the
    layout version before reading any array.
    """
    from rsst_jax import checkpoint as ckpt

    if not isinstance(ref, CheckpointRef):
        ref = resolve_checkpoint(ref)
    try:
        meta = ckpt.read_meta(ref.directory, ref.step)
    except ckpt.CheckpointError as e:
        raise RunDirError(str(e)) from None
    if meta.get("layout_version") != ckpt.LAYOUT_VERSION:
        raise RunDirError(f"{ref.path} has checkpoint layout version {meta.get('layout_version')}, "
                          f"this rsst-jax reads version {ckpt.LAYOUT_VERSION}: it comes from an "
                          f"older or newer layout; re-run it or open it with that version")
    try:
        tree, _ = ckpt.restore_raw(ref.directory, ref.step)
    except ckpt.CheckpointError as e:
        raise RunDirError(str(e)) from None
    if not isinstance(tree, dict):
        raise RunDirError(f"{ref.path} does not hold a dictionary of arrays")
    if "params" not in tree and isinstance(tree.get("state"), dict):
        state = tree["state"]
        tree = {"params": state.get("params"), "batch_stats": state.get("batch_stats", {}),
                "masks": tree.get("masks")}
    if not isinstance(tree.get("params"), dict):
        raise RunDirError(f"{ref.path} has no 'params': not a network checkpoint of this layout")
    tree.setdefault("batch_stats", {})
    return tree, meta, ref
