r"""Run a grid of runs, then compare them: python -m experiments.sweep.

Example (IMP vs Refill vs RSST, two seeds each, 3 x 2 = 6 cells):

    python -m experiments.sweep --out results/methods \
        --base "--dataset digits --arch res20s --epochs 2 --warmup 0 --pruning_times 3" \
        --grid struct=none,refill,rsst --grid seed=0,1

Cells are the product of the --grid KEY=V1,V2 axes (times the named --variant flag
sets, if any). The --base flags are read once into a configuration of experiments.run;
a cell is that configuration with the variant's flags, then the cell's values (which
win), and its own run directory OUT/<cell name>, named after the cell's values, e.g.
OUT/struct=rsst,criteria=l1. A cell whose summary already has all its rounds is
skipped; one with checkpoints but unfinished is resumed; one whose saved configuration
differs from what the sweep would run now is refused (delete it or choose another
--out). Finally experiments.compare writes OUT/comparison.csv, .md and .png over all
finished cells; OUT/sweep.json records the plan, each cell's command and outcome.

Cells that differ only in settings that tickets of one compiled program may differ in
(seed, lr, rate, rate_schedule, fillback_rate, criteria, the lambda schedule, its scale,
exponents and cap: the flags declared groupable, rsst_jax.config.names_where(groupable=True))
train together as one program,
each still writing its own ordinary run directory; --no-group trains one program per
cell. New and unfinished cells never share a program.

Programs run one after another in subprocesses (default; a crash stays in its program,
the output goes to OUT/<cell>/run.log of each of its cells), --parallel N at a time
(--devices 0,1 gives each its own GPU through CUDA_VISIBLE_DEVICES), or all in this
process (--mode inprocess: no start-up cost per program). --import MODULE imports your
module first, so a network, criterion or method registered there is available to every
cell.
Ctrl-C (or SIGTERM) stops the sweep and its cells within a second or two, OUT/sweep.json
keeping each cell's outcome; the same command resumes.

--launcher slurm runs each program as one SLURM job (through submitit), --launcher ray as
one task of a running Ray cluster (--ray_address); both need pip install
'rsst-jax[cluster]' and a file system the sweep and the nodes share. A job that is
preempted or reaches its time limit is requeued, a task whose node died runs again
elsewhere; either way the program resumes its cells from their newest checkpoints.
With --detach the sweep submits the jobs and returns; --status OUT shows each cell (done,
running or queued with its job id, failed with the last line of its log); the same sweep
command again collects what finished and submits only what is missing (docs/cluster.md).

Exit codes: 0 every cell finished, 1 some cell failed, 2 bad input, 130 interrupted.
"""
from __future__ import annotations

import argparse
import pathlib
import shlex
import sys
from typing import Optional, Sequence

from experiments import cli, launchers
from experiments import compare as compare_cmd
from experiments.sweep import programs as program_lib
from experiments.sweep import record as record_lib
from experiments.sweep.planning import State, SweepError, classify, plan, plan_programs
from experiments.sweep.running import Runner
from rsst_jax import parallel
from rsst_jax import paths as paths_lib

LAUNCHERS = ("local", "slurm", "ray")
# Flags of one launcher only: flag -> the launchers that take it.
LAUNCHER_FLAGS = {"partition": ("slurm",), "mem": ("slurm",), "time": ("slurm",),
                  "sbatch": ("slurm",), "detach": ("slurm",), "gpus": ("slurm", "ray"),
                  "cpus": ("slurm", "ray"), "ray_address": ("ray",)}
LOCAL_FLAGS = {"parallel": 1, "devices": "", "mode": "subprocess"}  # flag -> its default


def build_parser(status: bool = False) -> argparse.ArgumentParser:
    p = cli.OneLineParser(
        prog="python -m experiments.sweep", formatter_class=cli.DocHelpFormatter,
        description=cli.help_text(__doc__.split("\n\n", 1)[1]),
        epilog="Exit codes: 0 every cell finished, 1 some cell failed, 2 bad input (one line "
               "on stderr), 130 interrupted (the same command resumes).")
    p.add_argument("--out", required=not status,
                   help="folder for the cells' run directories and the comparison")
    p.add_argument("--base", default="", help="experiments.run flags shared by every cell, in "
                   "quotes (default: none, experiments.run's defaults)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="one axis of the grid: a flag of experiments.run and its values (use | "
                        "between values that contain commas); repeat for more axes (default: none)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME='FLAGS'",
                   help="a named set of extra flags; cells = variants x grid; repeat for more "
                        "(default: none)")
    p.add_argument("--group", action=argparse.BooleanOptionalAction, default=True,
                   help="train cells that differ only in seed, lr, rates, criteria or the "
                        "lambda schedule as one program; --no-group: one per cell")
    p.add_argument("--mode", choices=("subprocess", "inprocess"), default="subprocess",
                   help="subprocess: one process per program; inprocess: all in this process")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="programs at once (subprocess mode)")
    p.add_argument("--devices", default="", metavar="IDS",
                   help="comma-separated CUDA device ids handed to the parallel programs in "
                        "turn (default: every program sees every device)")
    cli.add_import_flag(p)
    p.add_argument("--dry_run", action="store_true", help="print the cells and their status, run nothing")
    p.add_argument("--no_compare", action="store_true", help="do not run experiments.compare at the end")
    p.add_argument("--compare_args", default="", metavar="FLAGS",
                   help="extra flags for experiments.compare, e.g. \"--metric "
                        "test_acc_at_best_val\" (default: none)")
    p.add_argument("--status", metavar="OUT", default=None,
                   help="show each cell of the sweep in OUT and where it is (done, running or "
                        "queued with its job id, failed with its log's last line), run nothing "
                        "(default: off)")
    c = p.add_argument_group("where programs run")
    c.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: here (--mode, --parallel, --devices); slurm: one job per "
                        "program through submitit; ray: one task per program on --ray_address")
    c.add_argument("--detach", action="store_true",
                   help="slurm: submit the jobs and return; the same command later collects "
                        "them (default: wait for them)")
    c.add_argument("--partition", default=None, help="slurm: the partition (default: the "
                   "cluster's default partition)")
    c.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="slurm, ray: GPUs per program (default: 0)")
    c.add_argument("--cpus", type=int, default=None, metavar="N",
                   help="slurm, ray: CPU cores per program (default: 1)")
    c.add_argument("--mem", default=None, metavar="SIZE",
                   help="slurm: memory per job, e.g. 16G (default: the partition's)")
    c.add_argument("--time", type=int, default=None, metavar="MINUTES",
                   help="slurm: time limit per job in minutes; a job reaching it is requeued "
                        "and resumes (default: 240)")
    c.add_argument("--sbatch", default=None, metavar="OPTIONS",
                   help="slurm: any other sbatch options as --name=value, e.g. \"--account=abc "
                        "--qos=high\" (default: none)")
    c.add_argument("--ray_address", default=None, metavar="HOST:PORT",
                   help="ray: the head of a running cluster; it must answer within 30 s "
                        "(default: none)")
    return p


def check_launcher_flags(args) -> None:
    """Each flag with the launcher that uses it (one line saying which, otherwise)."""
    for flag, takers in LAUNCHER_FLAGS.items():
        given = getattr(args, flag)
        if given not in (None, False) and args.launcher not in takers:
            raise SweepError(f"--{flag} is for --launcher {' or '.join(takers)}; drop it or "
                             f"add --launcher {takers[0]}")
    if args.launcher != "local":
        for flag, default in LOCAL_FLAGS.items():
            if getattr(args, flag) != default:
                raise SweepError(f"--{flag} is for --launcher local (a {args.launcher} "
                                 f"launcher runs every program at once where it has room)")
    if args.launcher == "ray" and not args.ray_address:
        raise SweepError("--launcher ray needs --ray_address HOST:PORT of a running cluster's "
                         "head (ray start --head prints it)")
    for flag in ("gpus", "cpus", "time"):
        value = getattr(args, flag)
        if value is not None and value < (1 if flag != "gpus" else 0):
            raise SweepError(f"--{flag} must be >= {1 if flag != 'gpus' else 0}, got {value}")


def make_launcher(args, out: pathlib.Path):
    """The launcher the flags ask for (bad input where it cannot be used here)."""
    if args.launcher == "local" and args.mode == "inprocess":
        return launchers.InProcess(program_lib.run_here)
    if args.launcher == "local":
        return launchers.Subprocesses(args.parallel,
                                      [d.strip() for d in args.devices.split(",") if d.strip()])
    try:
        if args.launcher == "slurm":
            return launchers.Slurm(out / record_lib.JOBS, partition=args.partition,
                                   gpus=args.gpus or 0, cpus=args.cpus or 1, mem=args.mem,
                                   time_min=args.time or 240, sbatch=args.sbatch or "")
        return launchers.Ray(args.ray_address, gpus=args.gpus or 0, cpus=args.cpus or 1)
    except launchers.LauncherError as e:
        raise SweepError(str(e)) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    status = any(a == "--status" or a.startswith("--status=") for a in argv)
    args = build_parser(status=status).parse_args(argv)
    if args.status is not None:
        return cli.run_command(lambda: record_lib.show_status(pathlib.Path(args.status)))
    # $RSST_JAX_CPU_DEVICES before this process touches JAX (--mode inprocess; subprocess
    # cells inherit the variable).
    parallel.split_cpu()
    resume = cli.resume_command("experiments.sweep", argv, resume_flag=None)
    stops: list = []  # what Ctrl-C or SIGTERM does, once the sweep has a runner
    with program_lib.sigterm_as_interrupt():
        return cli.run_command(lambda: sweep(args, resume, stops.append), resume=resume,
                               on_interrupt=lambda: [stop() for stop in stops])


def sweep(args, resume: str, on_interrupt=lambda stop: None) -> int:
    """The command, parsed: plan, classify, train what is left, compare. ``resume``: the
    command that resumes it; ``on_interrupt(stop)`` hands over what a Ctrl-C must do."""
    out = pathlib.Path(args.out)
    check_launcher_flags(args)
    if args.parallel < 1:
        raise SweepError(f"--parallel must be >= 1, got {args.parallel}")
    if args.mode == "inprocess" and args.parallel > 1:
        raise SweepError("--parallel needs --mode subprocess")
    try:
        base = shlex.split(args.base)
    except ValueError as e:
        raise SweepError(f"--base: cannot split the flags ({e})") from None
    cli.import_modules(args.imports)  # registered names must exist before validation
    cells = plan(out, base, args.grid, args.variant)
    for cell in cells:
        classify(cell)
    programs = plan_programs(cells, grouped=args.group)
    width = max(len(c.name) for c in cells)
    shared = sum(len(p) > 1 for p in programs)
    print(f"[sweep] {len(cells)} cells in {out}" + (
        f"; {len(programs)} programs to train, {shared} of them shared by several cells"
        if shared else "") + ":")
    for c in cells:
        together = c.program is not None and len(programs[c.program]) > 1
        print(f"  {c.name.ljust(width)}  {c.status}" + (f": {c.note}" if c.note else "")
              + (f"  (program {c.program + 1})" if together else ""))
    stale = [c for c in cells if c.status == State.STALE]
    if stale:
        raise SweepError(f"cell {stale[0].name} in {out} {stale[0].note}")
    if args.dry_run:  # the command of each cell the sweep would train now
        for program in programs:
            for c in program:
                print(c.command)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    launcher = make_launcher(args, out)
    previous = record_lib.read(out)
    runner = Runner(launcher, args.imports, resume,
                    record=lambda: record_lib.write(out, args, cells))
    on_interrupt(lambda: runner.interrupted(cells))
    runner.record()
    if previous.get("launcher") == launcher.name == "slurm":
        programs = runner.collect(cells, programs, previous)
    status_command = paths_lib.command("experiments.sweep", ["--status", str(out)])
    if runner.run(programs, detach=args.detach, status_command=status_command):
        return 0  # --detach: the jobs run on
    runner.record()
    failed = [c for c in cells if c.status == State.FAILED]
    finished = [c for c in cells if c.status in (State.DONE, State.FINISHED)]
    print(f"[sweep] {len(finished)} of {len(cells)} cells finished"
          + (f", {len(failed)} failed: {', '.join(c.name for c in failed)}" if failed else ""))
    if finished and not args.no_compare:
        have_rows = [c for c in finished if paths_lib.RunPaths.of(c.path).summary_json.is_file()]
        code = compare_cmd.main([str(c.path) for c in have_rows]
                                + ["--names", ",".join(c.name.replace(",", " ") for c in have_rows),
                                   "--out", str(out / record_lib.COMPARISON),
                                   "--plot", str(out / f"{record_lib.COMPARISON}.png")]
                                + shlex.split(args.compare_args))
        if code != 0:
            return code
    return 1 if failed else 0


__all__ = ["main", "sweep", "build_parser", "check_launcher_flags", "make_launcher",
           "LAUNCHERS", "LAUNCHER_FLAGS"]
