"""One program of a sweep: ``python -m experiments.sweep.program [--import MODULE]...
--cell='RUN FLAGS' [--cell='RUN FLAGS' ...]``.

Each ``--cell`` is the experiments.run command line of one cell, shell-quoted into one
argument; the cells' tickets train as one program (``rsst_jax.driver.run`` of all their
configurations, each ``--num_seeds`` cell expanded per ticket), each writing its own run
directory. Every launcher of experiments.sweep runs this command (a child process, a
SLURM job, a Ray task); ``--mode inprocess`` calls ``run_here`` with the same arguments.
SIGTERM (a scheduler's preemption or scancel) stops it as Ctrl-C does: after its newest
checkpoint, the run locks released, exit 130; started again, it resumes.

Exit codes: those of experiments.run (0 done, 2 bad input, 3 diverged, 130 interrupted).
(The entry point is experiments/sweep/program.py, which nothing imports, so that
``python -m`` runs it as a module imported once.)
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import threading
from typing import Sequence

from experiments import cli
from experiments import run as run_cmd
from rsst_jax import driver, parallel

MODULE = "experiments.sweep.program"
RESUME_ENV = "RSST_JAX_SWEEP_RESUME"  # the sweep's command, for its cells' Ctrl-C line


def build_parser() -> cli.OneLineParser:
    p = cli.OneLineParser(prog=f"python -m {MODULE}", formatter_class=cli.DocHelpFormatter,
                          description=cli.help_text(__doc__.split("\n\n", 1)[1]))
    cli.add_import_flag(p)
    p.add_argument("--cell", action="append", required=True, metavar="'RUN FLAGS'",
                   help="the experiments.run flags of one cell, quoted as one argument; "
                        "repeat for each cell of the program")
    return p


def arguments(cells: Sequence[Sequence[str]], imports: Sequence[str]) -> list[str]:
    """This command's arguments for the cells' experiments.run command lines ``cells``."""
    return ([x for m in imports for x in ("--import", m)]
            + [f"--cell={shlex.join(argv)}" for argv in cells])


def configs_of(cells: Sequence[str]) -> list:
    """The configurations of the program's tickets (``--num_seeds`` expanded)."""
    return [cfg for text in cells
            for cfg in run_cmd.seed_configs(cli.parse_run_args(shlex.split(text)))]


def train(configs: Sequence) -> None:
    """Train ``configs`` as one program (``driver.run``), after the run command's checks."""
    for cfg in configs:
        cli.check_paths(cfg)
    parallel.enable_compilation_cache()  # $RSST_JAX_CACHE; the cells share compiled programs
    driver.run(list(configs))


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While active, SIGTERM (kill, a scheduler's preemption, scancel) interrupts this
    process as Ctrl-C does (``cli.run_command`` then ends it with 130). Only the main
    thread can set a handler; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM,
                             lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_here(argv: Sequence[str]) -> tuple[int, str]:
    """The program of ``argv`` (this command's arguments) in this process: its exit code
    and, where it raised, the error in one line."""
    args = build_parser().parse_args(list(argv))
    try:
        return cli.run_command(lambda: train(configs_of(args.cell)), imports=args.imports), ""
    except Exception as e:  # noqa: BLE001  a crash in one program must not lose the others
        return 1, f"{e.__class__.__name__}: {cli.one_line(e)[:300]}"
    except SystemExit as e:
        return (e.code if isinstance(e.code, int) else 1), ""


__all__ = ["MODULE", "RESUME_ENV", "build_parser", "arguments", "configs_of", "train",
           "sigterm_as_interrupt", "run_here"]
