"""The command line of every ``python -m experiments.<command>``.

For ``experiments.run`` (and the sweeps that vary its configuration):

- ``run_parser()``: the flags of ``experiments.run`` (the PyTorch reference's names and
  defaults, generated from ``rsst_jax.config``), with the help texts below;
- ``parse_run_args(argv)``: command line (and ``--config FILE``) -> ``Config``, every
  error one line (``ConfigError``); ``parse_run_values``/``explicit_values`` stop before
  validation; ``flag_value`` reads one flag's value from text; ``config_argv`` is the
  inverse: the command line of a ``Config``;
- ``check_paths(cfg)``: the checks that look at the file system;
- ``flags_markdown()``: the README's flag table.

For every command: ``OneLineParser`` (argparse whose usage errors are one line and exit
2), ``HelpFormatter`` (each flag's default shown once), ``help_text`` (a module
docstring as help text), ``fail``, and ``run_command(body)``, the one exit-code
contract: 0 done, 2 bad input (one line on stderr saying what to do, no traceback), 3
training diverged, 130 interrupted (Ctrl-C: one line naming the command that resumes,
within about a second, also while XLA compiles).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pathlib
import select
import signal
import sys
import tempfile
import threading
from typing import Any, Callable, Optional, Sequence

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

import yaml

from rsst_jax import config as config_lib
from rsst_jax import methods, paths, runlock
from rsst_jax.config import ConfigError


EPILOG = ("Environment: RSST_JAX_CACHE=DIR|off keeps compiled programs (by default in "
          "~/.cache/rsst_jax/jax); RSST_JAX_CPU_DEVICES=N splits the host CPU into N devices "
          "and trains data parallel over them (CPU only, opt-in). Exit codes: 0 done, 2 bad "
          "input, 3 training diverged, 130 interrupted (Ctrl-C). Details: README.md and docs/.")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once: not where the help text already says what it is, nor for
    a required argument or a switch that is off unless given."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("(default" in text or "when not given" in text or action.default is argparse.SUPPRESS
                or action.required or action.option_strings == ["-h", "--help"]):
            return text
        return super()._get_help_string(action)

    def format_help(self) -> str:
        return super().format_help().replace("``", "")  # docstrings' reST literals


class DocHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """HelpFormatter keeping the description's (a module docstring's) own line breaks."""


EXIT_CODES = "Exit codes: 0 done, 2 bad input (one line on stderr saying what to do)"


def help_text(doc: str) -> str:
    """A module docstring as help text: no reStructuredText double backticks, no
    'Exit codes' paragraph (the epilog says it)."""
    paragraphs = [p for p in doc.strip().split("\n\n") if not p.startswith("Exit codes")]
    return "\n\n".join(paragraphs).replace("``", "")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line on stderr and exits with 2."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # --epoch is not --epochs
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):  # noqa: D401 (argparse API)
        self.exit(2, f"error: {message} (see {help_command(self.prog)})\n")


def help_command(prog: str) -> str:
    """The command that shows the help of ``prog`` ('python -m experiments.run'), as a
    shell runs it (``paths.command``: this interpreter, and PYTHONPATH where needed)."""
    if prog.startswith("python -m "):
        return paths.command(prog.split()[2], ["--help"])
    return f"{prog} --help"


def one_line(message) -> str:
    """``message`` (text or an exception) on one line."""
    text = " ".join(str(message).split())
    return text or (message.__class__.__name__ if isinstance(message, BaseException) else "")


def fail(message) -> int:
    """Print ``error: message`` as one line on stderr; returns 2, the exit code of bad input."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    return 2


def _is_switch_pair(name: str) -> bool:
    """Whether boolean flag ``name`` has a ``--no-NAME`` form (its default is not False)."""
    return config_lib.field_of(name).default is not False


def _bool_flag(parser, name, field_default, default, help_text):
    if _is_switch_pair(name):
        parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default,
                            help=help_text)
    else:
        parser.add_argument(f"--{name}", action="store_true", default=default, help=help_text)


def run_parser(prog: str = "python -m experiments.run", *, defaults: bool = True
               ) -> argparse.ArgumentParser:
    """The parser of ``experiments.run``: one flag per configuration field. With
    ``defaults=False`` a flag not on the command line is absent from the result."""
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=HelpFormatter, epilog=EPILOG, allow_abbrev=False,
        description="Find structurally sparse lottery tickets: IMP, Refill and RSST rounds, "
                    "and the baselines slimming, SSL, GReg and DepGraph. "
                    "Quick start: --dataset digits.")
    allowed = config_lib.choices()
    sections = {}  # one --help section per configuration group
    for name, group in config_lib.group_of_flags().items():
        if group not in sections:
            sections[group] = parser.add_argument_group(_section_title(group))
        section = sections[group]
        field, facts = config_lib.field_of(name), config_lib.facts(name)
        default = field.default if defaults else argparse.SUPPRESS
        help_text = facts.help.replace("%", "%%")  # argparse formats help with %
        kind = config_lib.flag_type(name).base
        if kind is bool:
            _bool_flag(section, name, field.default, default, help_text)
            continue
        flag_type = kind
        # A registry's values are checked by validation, whose message says how to add one.
        extra = {"choices": allowed[name]} if name in allowed and facts.registry is None else {}
        section.add_argument(f"--{name}", type=flag_type, default=default, help=help_text,
                             **extra)
    add_import_flag(parser, defaults)
    _host_flags(parser.add_argument_group(
        "one run over several processes (new; not part of the run's configuration, see "
        "docs/cluster.md)"), defaults)
    return parser


_SECTIONS = {"data": "data", "model": "network", "optim": "training",
             "prune": "pruning", "run": "the run"}


def _section_title(group: str) -> str:
    """The --help section of a configuration group; a method's own group names it."""
    owner = [m.name for m in methods.registered() if (m.settings or (None,))[0] == group]
    return _SECTIONS.get(group) or (f"{group}: flags of --struct {owner[0]}" if owner else group)


def add_import_flag(parser, defaults: bool = True) -> None:
    """``--import MODULE`` (repeatable): modules that register networks, criteria or
    methods, imported before the rest of the command line is checked."""
    parser.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                        default=[] if defaults else argparse.SUPPRESS,
                        help="(new) import MODULE first, so that a network, criterion or method "
                             "registered there can be named; repeat for more (default: none)")


def import_modules(modules: Sequence[str]) -> None:
    """Import each of ``modules`` (``--import``); BadInput (exit 2) on one that fails."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise BadInput(f"--import {module}: {one_line(e)} (is its folder the working "
                           f"directory or on PYTHONPATH?)") from None


def imports_of(argv: Optional[Sequence[str]]) -> list[str]:
    """The ``--import`` modules of ``argv``, in order."""
    return list(_outside_config(argv)["imports"])


# How the processes of one run find each other (parallel.init_distributed): flags of
# experiments.run, but no part of its configuration (each process has its own --process_id).
HOST_FLAGS = {
    "coordinator_address": (str, "HOST:PORT of process 0, where the processes of one run "
                                 "meet (with --num_processes and --process_id; inside a SLURM "
                                 "job step of several tasks, srun sets all three itself)"),
    "num_processes": (int, "processes of the run, one per host or per srun task"),
    "process_id": (int, "this process's rank, 0 .. --num_processes - 1; process 0 writes the "
                        "run's files"),
}


def _host_flags(parser, defaults: bool = True) -> None:
    for name, (kind, text) in HOST_FLAGS.items():
        parser.add_argument(f"--{name}", type=kind, help=text,
                            default=None if defaults else argparse.SUPPRESS)


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(f"{message} (see {help_command('python -m experiments.run')})")


def _outside_config(argv: Optional[Sequence[str]]) -> dict[str, Any]:
    """experiments.run's flags that are no part of its configuration (``--import`` and
    the several-process flags), read from ``argv``; ConfigError (one line) on a bad one."""
    parser = _RaisingParser(add_help=False, allow_abbrev=False)
    add_import_flag(parser)
    _host_flags(parser)
    return vars(parser.parse_known_args(list(argv or []))[0])


def host_values(argv: Optional[Sequence[str]]) -> dict[str, Any]:
    """``--coordinator_address``, ``--num_processes``, ``--process_id`` of ``argv``
    (None where not given); ConfigError (one line) on a bad value."""
    values = _outside_config(argv)
    return {name: values[name] for name in HOST_FLAGS}


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML, TOML or JSON file of flag values; unknown keys are an error."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".toml":
            values = tomllib.loads(text)
        elif p.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            values = yaml.safe_load(text) or {}
    except Exception as e:  # parser errors differ per format; the message names the file
        raise ConfigError(f"--config {path}: cannot parse it ({e.__class__.__name__}: {e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    unknown = sorted(set(values) - set(config_lib.flag_names()))
    if unknown:
        raise ConfigError(f"--config {path}: unknown keys {', '.join(unknown)} "
                          f"(see {help_command('python -m experiments.run')})")
    return values


def explicit_values(argv: Optional[Sequence[str]], prog: str = "python -m experiments.run"
                    ) -> dict[str, Any]:
    """The flags given on the command line ``argv`` (even those equal to their default),
    typed; ConfigError (one line) on a bad one. The several-process flags are not among
    them (``host_values``)."""
    given = vars(one_line_parse(run_parser(prog, defaults=False), argv, prog))
    return {k: v for k, v in given.items() if k not in HOST_FLAGS and k != "imports"}


def explicit_flags(argv: Optional[Sequence[str]], prog: str = "python -m experiments.run"
                   ) -> set[str]:
    """The names of the flags given on the command line ``argv``."""
    return set(explicit_values(argv, prog))


def parse_run_values(argv: Optional[Sequence[str]] = None,
                     prog: str = "python -m experiments.run") -> dict[str, Any]:
    """Command line (and --config file) -> every flag's value, not yet validated:
    defaults, then the file, then the command line."""
    given = explicit_values(argv, prog)
    values = {name: config_lib.field_of(name).default for name in config_lib.flag_names()}
    if given.get("config"):
        values.update(load_config_file(given["config"]))
    values.update(given)
    return values


def parse_run_args(argv: Optional[Sequence[str]] = None,
                   prog: str = "python -m experiments.run") -> config_lib.Config:
    """Command line (and --config file) -> validated Config; command-line flags override
    the file. Every error is one ConfigError line; ``--help`` exits 0 (SystemExit)."""
    return config_lib.validate(config_lib.Config.from_dict(parse_run_values(argv, prog)))


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def flag_value(name: str, text: str) -> Any:
    """The value ``text`` gives flag ``name`` of experiments.run (argparse's type and
    choices; a switch takes true/false, and one with a --no- form also none: unset);
    ConfigError on an unknown flag or a bad value."""
    if name not in config_lib.group_of_flags():
        raise ConfigError(f"experiments.run has no flag --{name}")
    if config_lib.flag_type(name).base is bool:
        v = text.strip().lower()
        if v in _TRUE or v in _FALSE:
            return v in _TRUE
        if v == "none" and config_lib.field_of(name).default is None:
            return None
        raise ConfigError(f"--{name} is a switch; use {name}=true,false")
    return explicit_values([f"--{name}={text}"])[name]


def config_argv(cfg: config_lib.Config) -> list[str]:
    """The command line of experiments.run that resolves to ``cfg`` (``parse_run_args``
    of it equals ``cfg``): its flags that differ from their defaults, in flag order.
    A --config file's values are written out, so the file is not named."""
    argv = []
    for name, value in cfg.to_dict().items():
        if name == "config" or value == config_lib.field_of(name).default:
            continue
        if isinstance(value, bool):
            argv.append(f"--{name}" if value else f"--no-{name}")
        elif value is not None:
            text = repr(value) if isinstance(value, float) else str(value)
            argv += [f"--{name}={text}"] if text.startswith("-") else [f"--{name}", text]
    return argv


def one_line_parse(parser: argparse.ArgumentParser, argv, prog: str) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with argparse's usage text and error folded into one
    ConfigError line (argparse prints two or more lines and exits 2 by itself)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit as e:
        if not e.code:  # --help
            raise
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        text = lines[-1].split(": error: ", 1)[-1] if lines else "bad command line"
        raise ConfigError(f"{text} (see {help_command(prog)})") from None


def check_paths(cfg: config_lib.Config) -> None:
    """The checks that look at the file system, before any compute: the input files
    exist and --save_dir can be written (nothing is created here)."""
    p, r = cfg.prune, cfg.run
    if p.pretrained is not None and not os.path.exists(p.pretrained):
        raise ConfigError(f"--pretrained {p.pretrained}: no such file or directory")
    if r.checkpoint is not None and not os.path.isdir(r.checkpoint):
        raise ConfigError(f"--checkpoint {r.checkpoint}: no such directory")
    if r.init is not None and os.path.exists(r.init) and not os.path.isdir(r.init):
        raise ConfigError(f"--init {r.init} is a file; it must be a checkpoint directory "
                          f"(or a new path)")
    check_save_dir(r.save_dir)
    if r.wandb is not None:
        try:
            import wandb  # noqa: F401  # start-up: optional (rsst-jax[wandb]), 0.3 s
        except ImportError:
            raise ConfigError(f"--wandb {r.wandb} needs the wandb package: "
                              f"pip install -e \".[wandb]\"") from None
        if not r.wandb.rpartition("/")[2]:
            raise ConfigError(f"--wandb {r.wandb!r} must name a project: [ENTITY/]PROJECT")


def _unwritable(path) -> Optional[str]:
    """Why directory ``path`` can be neither made nor written (judged by its nearest
    existing ancestor), or None. Some file systems refuse what the permissions allow
    (/proc, /sys, a read-only mount, where root may write everywhere): a directory is
    made there and removed at once, so nothing is left behind."""
    target = pathlib.Path(path).absolute()
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing}: permission denied"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".rsst-jax-probe-", dir=existing))
    except OSError as e:
        if existing == target:
            return f"no directory can be made in {target}: {e.strerror or e}"
        first = existing / target.relative_to(existing).parts[0]
        return f"{first} cannot be created: {e.strerror or e}"
    return None


def check_save_dir(path: str) -> None:
    """Fail early when the run directory cannot be written; creates nothing."""
    why = _unwritable(path)
    if why:
        raise ConfigError(f"--save_dir {path} is not writable ({why}); choose another "
                          f"directory with --save_dir")


def check_out_dir(path, flag: str = "--out") -> pathlib.Path:
    """An output directory a command may create or write into; BadInput (one line) when
    it is a file or cannot be written. Creates nothing."""
    p = pathlib.Path(path)
    if p.exists() and not p.is_dir():
        raise BadInput(f"{flag} {path} is a file; give a new or existing directory")
    why = _unwritable(p)
    if why:
        raise BadInput(f"{flag} {path} is not writable ({why}); choose another directory")
    return p


# --------------------------------------------------------------------------- exit codes

class BadInput(ValueError):
    """Input a command cannot use; the message says what to do instead."""


# Errors that mean bad input (exit 2), by the module that defines them: looked up only in
# modules already imported, so a command that never imported JAX does not import it here.
_BAD_INPUT = {"rsst_jax.config": "ConfigError", "rsst_jax.data": "DataError",
              "rsst_jax.checkpoint": "CheckpointError", "rsst_jax.runlock": "RunLocked",
              "rsst_jax.starting": "RunError", "rsst_jax.engine": "EngineError",
              "rsst_jax.runs": "RunDirError", "rsst_jax.pretrained": "PretrainedError",
              "rsst_jax.parallel": "DistributedError"}
_DIVERGED = {"rsst_jax.callbacks": "TrainingDiverged"}


def _loaded(table: dict) -> tuple:
    return tuple(getattr(sys.modules[m], name) for m, name in table.items() if m in sys.modules)


def exit_code_of(error: BaseException) -> Optional[int]:
    """2 for bad input, 3 for a diverged run, None for anything else (a bug: traceback)."""
    if isinstance(error, (BadInput, ConfigError) + _loaded(_BAD_INPUT)):
        return 2
    if isinstance(error, _loaded(_DIVERGED)):
        return 3
    if isinstance(error, OSError) and error.filename:
        return 2
    return None


def resume_command(module: str, argv: Sequence[str], resume_flag: Optional[str] = "--resume"
                   ) -> str:
    """The shell command that runs ``python -m module argv`` again, with ``resume_flag``
    added where it is not already there."""
    argv = list(argv)
    if resume_flag and resume_flag not in argv:
        argv.append(resume_flag)
    return paths.command(module, argv)


def run_command(body: Callable[[], Optional[int]], *, resume: Optional[str] = None,
                on_interrupt: Optional[Callable[[], None]] = None,
                imports: Sequence[str] = ()) -> int:
    """``body()`` under the exit-code contract of every command: its return value (None:
    0); bad input: one ``error:`` line on stderr and 2; a diverged run: one line and 3.
    With ``resume`` (a command), Ctrl-C, SIGTERM or SIGUSR2 prints ``interrupted; resume
    with: RESUME`` and ends the process with 130 (``on_interrupt`` first) as soon as no
    checkpoint is being written, also while XLA compiles (see :class:`ExitOnInterrupt`). ``imports`` (``--import``) are imported first.
    ``--help``'s SystemExit passes through."""
    watch = ExitOnInterrupt(resume, on_interrupt) if resume else contextlib.nullcontext()
    try:
        with watch:
            import_modules(imports)  # --import: registrations before anything is checked
            code = body()
        return 0 if code is None else int(code)
    except KeyboardInterrupt:  # where no watch could be installed (not the main thread)
        if on_interrupt is not None:
            on_interrupt()
        print(interrupted_line(resume), file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # noqa: BLE001  classified below; anything else is re-raised
        code = exit_code_of(e)
        if code is None:
            raise
        text = f"{e.filename}: {e.strerror or one_line(e)}" if isinstance(e, OSError) \
            else one_line(e)
        print(f"error: {text}", file=sys.stderr, flush=True)
        return code


def interrupted_line(resume: Optional[str]) -> str:
    return f"interrupted; resume with: {resume}" if resume else "interrupted"


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001  a closed or broken stream: nothing to save
            pass


# What ends a command that can resume: Ctrl-C; a scheduler's SIGTERM (preemption, scancel,
# the time limit); SIGUSR2 (SLURM's warning before the time limit, --signal=USR2@SECONDS,
# which submitit asks for).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class ExitOnInterrupt:
    """While active (a context manager), SIGINT, SIGTERM and SIGUSR2 end the process: the
    checkpoint being written is committed first, then the run locks are released,
    ``cleanup()`` runs, one line on stderr names the command that resumes, and
    ``os._exit(130)``. A signal whose disposition was SIG_IGN at entry stays ignored (a
    launcher that handles SIGUSR2 itself ignores it in the command it starts).

    Python runs signal handlers only between bytecodes of the main thread, so a Ctrl-C
    during an XLA compilation or a long device computation would wait for it to end.
    Here the C-level handler's wakeup byte (``signal.set_wakeup_fd``) wakes a watcher
    thread, which does the stopping (the compiler releases the GIL); the Python handler
    itself does nothing, so the main thread goes on with what it was doing, a checkpoint
    write included. The watcher waits for checkpoint writes in flight
    (``rsst_jax.checkpoint.finish_writes``: at most ``WRITE_GRACE_S``, 20 s, inside
    SLURM's default KillWait of 30 s) and keeps new ones from starting; no write in
    flight, it exits at once. Exiting there is as safe as a kill after a commit:
    summaries are replaced atomically, a torn last log line is dropped on reading, and
    the run locks this process holds are released (``runlock.release_all``) only after
    the checkpoint is committed. Outside the main thread this does nothing
    (KeyboardInterrupt then reaches ``run_command``)."""

    def __init__(self, resume: Optional[str], cleanup: Optional[Callable[[], None]] = None):
        self.line, self.cleanup = interrupted_line(resume), cleanup
        self.lock = threading.Lock()
        self.active = False
        self.handled: dict = {}

    def __enter__(self) -> "ExitOnInterrupt":
        if threading.current_thread() is not threading.main_thread():
            return self
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self.old_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        for sig in STOP_SIGNALS:
            if sig == signal.SIGINT or signal.getsignal(sig) is not signal.SIG_IGN:
                self.handled[sig] = signal.signal(sig, _noted)
        self.active = True
        self.thread = threading.Thread(target=self._watch, name="exit-on-interrupt", daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while self.active:
            select.select([self.read_fd], [], [])
            try:
                data = os.read(self.read_fd, 512)
            except (BlockingIOError, OSError):
                continue
            if self.active and any(sig in data for sig in self.handled):
                self.exit()

    def exit(self) -> None:
        """Let the checkpoint in flight commit, clean up, print the line and end the
        process (once, whichever thread comes; never from the thread that writes)."""
        self.lock.acquire()  # a second caller waits here until the process is gone
        try:
            checkpoint = sys.modules.get("rsst_jax.checkpoint")  # not imported: no write
            if checkpoint is not None:
                checkpoint.finish_writes()
            runlock.release_all()  # no run.lock left behind: the resume takes it quietly
            if self.cleanup is not None:
                self.cleanup()
        finally:
            # What is buffered goes out, unless a full pipe would keep the process here.
            flusher = threading.Thread(target=_flush_streams, daemon=True)
            flusher.start()
            flusher.join(timeout=0.5)
            try:
                os.write(2, (self.line + "\n").encode())
            finally:
                os._exit(130)

    def __exit__(self, *exc) -> None:
        if not self.active:
            return
        self.active = False
        for sig, old in self.handled.items():
            signal.signal(sig, old)
        signal.set_wakeup_fd(self.old_fd)
        os.write(self.write_fd, b"\0")  # wakes the watcher, which sees it is done
        self.thread.join(timeout=5)
        os.close(self.read_fd)
        os.close(self.write_fd)


def _noted(signum, frame) -> None:
    """The Python-level handler of the stop signals: nothing (the watcher thread acts on
    the wakeup byte the C-level handler wrote)."""


def flags_markdown() -> str:
    """The flag table of README.md (a test keeps the two in step)."""
    allowed = config_lib.choices()
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    for name in config_lib.flag_names():
        facts = config_lib.facts(name)
        text = facts.help.replace("|", "\\|")
        if name in allowed and facts.registry is None:
            text += " (" + ", ".join(allowed[name]) + ")"
        lines.append(f"| `--{name}` | `{config_lib.field_of(name).default}` | {text} |")
    return "\n".join(lines)


__all__ = ["run_parser", "parse_run_args", "parse_run_values", "explicit_values",
           "explicit_flags", "flag_value", "config_argv", "one_line_parse", "load_config_file",
           "check_paths", "check_save_dir", "check_out_dir", "flags_markdown", "HelpFormatter",
           "DocHelpFormatter", "OneLineParser", "help_text", "one_line", "fail", "BadInput",
           "exit_code_of", "run_command", "resume_command", "interrupted_line",
           "ExitOnInterrupt", "STOP_SIGNALS", "EXIT_CODES"]
