"""Where a run keeps its files: the one module that knows the run-directory layout.

::

    SAVE_DIR/
      config.json             the resolved configuration (replay it with --config)
      init/<0>/               W0 (params, batch_stats); also wherever --init points
      checkpoints/<n>/        resume checkpoints, one per finished epoch (n counts the
                              epochs done in the run, one extra per round end); the
                              newest two are kept
      round_<r>/final/<e>/    round r's final ticket (params, batch_stats, masks)
      round_<r>/best/<e>/     round r's best-validation weights (e = the epoch, from 1)
      log.jsonl               one line per epoch
      summary.json, .csv      one row per round
      run.lock                held by the process running it
      seed_<s>/               with --num_seeds: one such directory per ticket
      run.log                 a sweep cell's screen output (experiments.sweep)
      plots/                  experiments.plot's pictures (by default)

Every path a command reads or writes comes from :class:`RunPaths`.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.machinery
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
from typing import Optional, Sequence, Union

PathLike = Union[str, os.PathLike]

CONFIG = "config.json"
INIT = "init"
CHECKPOINTS = "checkpoints"
LOG = "log.jsonl"
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"
LOCK = "run.lock"
FINAL, BEST = "final", "best"
ROUND_PREFIX = "round_"
OUTPUT = "run.log"
PLOTS = "plots"


def round_of(name: str) -> Optional[int]:
    """r for a directory named ``round_<r>``, else None."""
    if name.startswith(ROUND_PREFIX) and name[len(ROUND_PREFIX):].isdigit():
        return int(name[len(ROUND_PREFIX):])
    return None


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """The paths of the run in ``root``."""
    root: pathlib.Path

    @classmethod
    def of(cls, save_dir: PathLike) -> "RunPaths":
        return cls(pathlib.Path(save_dir))

    @property
    def config(self) -> pathlib.Path:
        return self.root / CONFIG

    @property
    def checkpoints(self) -> pathlib.Path:
        return self.root / CHECKPOINTS

    @property
    def log(self) -> pathlib.Path:
        return self.root / LOG

    @property
    def summary_json(self) -> pathlib.Path:
        return self.root / SUMMARY_JSON

    @property
    def summary_csv(self) -> pathlib.Path:
        return self.root / SUMMARY_CSV

    @property
    def lock(self) -> pathlib.Path:
        return self.root / LOCK

    @property
    def output(self) -> pathlib.Path:
        return self.root / OUTPUT

    @property
    def plots(self) -> pathlib.Path:
        return self.root / PLOTS

    def init(self, override: Optional[PathLike] = None) -> pathlib.Path:
        """W0's checkpoint directory: ``--init`` if given, else ``init/``."""
        return pathlib.Path(override) if override else self.root / INIT

    def round_dir(self, r: int) -> pathlib.Path:
        return self.root / f"{ROUND_PREFIX}{r}"

    def final(self, r: int) -> pathlib.Path:
        return self.round_dir(r) / FINAL

    def best(self, r: int) -> pathlib.Path:
        return self.round_dir(r) / BEST

    def seed(self, s: int) -> "RunPaths":
        """The run of ticket ``s`` of a ``--num_seeds`` run."""
        return RunPaths(self.root / f"seed_{s}")

    def rounds(self) -> list[int]:
        """Indices r of the ``round_<r>`` directories present, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(r for child in self.root.iterdir() if child.is_dir()
                      for r in [round_of(child.name)] if r is not None)


def seed_dir(save_dir: PathLike, s: int) -> pathlib.Path:
    return RunPaths.of(save_dir).seed(s).root


def checkpoint_step(round_idx: int, epochs_done: int, epochs_per_round: int) -> int:
    """The number of the resume checkpoint after ``epochs_done`` epochs of round
    ``round_idx`` (each round ends with one more, after its pruning)."""
    return round_idx * (epochs_per_round + 1) + epochs_done


class RunDirError(ValueError):
    """A path that is not a readable run or checkpoint; the message says what was expected."""


def is_run_dir(path: PathLike) -> bool:
    """True when ``path`` looks like a ``--save_dir`` (summary, log or config file present)."""
    run = RunPaths.of(path)
    return run.root.is_dir() and any(f.is_file() for f in (run.summary_json, run.log, run.config))


def atomic_write(path: pathlib.Path, text: str) -> None:
    """``path`` gets ``text`` whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def python_command(cwd: Optional[os.PathLike] = None) -> str:
    """How a printed command names this interpreter: ``python`` where that is what the
    shell finds first on PATH, else its path (relative to the working directory ``cwd``,
    default the current one, when under it, e.g. ``.venv/bin/python``), so a command
    copied from the screen finds the installed package."""
    exe = os.path.abspath(sys.executable)
    found = shutil.which("python")
    if found and os.path.abspath(found) == exe:
        return "python"
    try:
        return str(pathlib.Path(exe).relative_to(pathlib.Path(cwd or os.getcwd()).absolute()))
    except ValueError:
        return exe


# Asks this interpreter, started as a new shell would start it (no $PYTHONPATH, the
# working directory first on the path), whether it finds each module named.
_FINDS = ("import importlib.util, sys; "
          "sys.exit(0 if all(importlib.util.find_spec(m) for m in sys.argv[1:]) else 1)")


@functools.lru_cache(maxsize=64)
def _pythonpath_needed(modules: tuple, pythonpath: str, cwd: str) -> tuple:
    """The folders of ``pythonpath`` that hold ``modules`` where this interpreter does not
    find them without $PYTHONPATH (e.g. a checkout that is not installed, an --import
    module beside the data); () where it does."""
    given = [os.path.abspath(p) for p in pythonpath.split(os.pathsep) if p]
    if not given or not modules:
        return ()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        found = subprocess.run([sys.executable, "-c", _FINDS, *modules], cwd=cwd, env=env,
                               capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        found = False
    if found:
        return ()
    holding = [p for p in given if any(importlib.machinery.PathFinder.find_spec(m, [p])
                                       for m in modules)]
    return tuple(dict.fromkeys(holding or given))


def command(module: str, argv: Sequence[str] = (), imports: Sequence[str] = ()) -> str:
    """The shell command that runs ``python -m module`` with ``--import`` of each of
    ``imports`` (where they are not in ``argv`` already), then ``argv``: pasted into a
    shell in the working directory it runs as this process does, with this interpreter
    (``python_command``) and, where the packages or the --import modules are found only
    through $PYTHONPATH, ``PYTHONPATH=...`` before it."""
    argv = list(argv)
    extra = [x for m in imports if m not in argv for x in ("--import", m)]
    words = extra + argv
    needed = [module] + [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--import"]
    tops = tuple(dict.fromkeys(m.split(".")[0] for m in needed))
    folders = _pythonpath_needed(tops, os.environ.get("PYTHONPATH", ""), os.getcwd())
    prefix = [f"PYTHONPATH={shlex.quote(os.pathsep.join(folders))}"] if folders else []
    return " ".join(prefix + [python_command(), "-m", module]
                    + ([shlex.join(words)] if words else []))


__all__ = ["python_command", "command", "RunPaths", "RunDirError", "is_run_dir", "atomic_write", "seed_dir", "checkpoint_step", "round_of", "CONFIG", "INIT", "CHECKPOINTS",
           "LOG", "SUMMARY_JSON", "SUMMARY_CSV", "LOCK", "FINAL", "BEST", "ROUND_PREFIX",
           "OUTPUT", "PLOTS"]
