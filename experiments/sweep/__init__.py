"""``python -m experiments.sweep``: a grid of runs, then their comparison.

The command's text (and ``--help``) is ``experiments.sweep.command``'s. The package is
split by job: ``planning`` (cells, their states, programs), ``record`` (OUT/sweep.json,
``--status``), ``running`` (one loop over any launcher of ``experiments.launchers``),
``programs`` (the command each program runs, ``python -m experiments.sweep.program``) and
``command`` (flags, main). The names below are its public face.
"""
from experiments.sweep.command import (
    LAUNCHER_FLAGS, LAUNCHERS, build_parser, check_launcher_flags, main, make_launcher, sweep)
from experiments.sweep.planning import (
    RESERVED, TRANSITIONS, Cell, State, SweepError, cell_name, classify, parse_axis,
    parse_variant, plan, plan_programs, summary_rows)
from experiments.sweep.programs import RESUME_ENV
from experiments.sweep.record import COMPARISON, JOBS, RECORD, show_status

__all__ = ["main", "sweep", "build_parser", "check_launcher_flags", "make_launcher", "LAUNCHERS",
           "LAUNCHER_FLAGS", "Cell", "State", "TRANSITIONS", "SweepError", "RESERVED", "plan",
           "classify", "plan_programs", "parse_axis", "parse_variant", "cell_name",
           "summary_rows", "RESUME_ENV", "RECORD", "COMPARISON", "JOBS", "show_status"]
