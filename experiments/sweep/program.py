"""``python -m experiments.sweep.program``: train the cells of one sweep program
(``experiments.sweep.programs`` says how)."""
from __future__ import annotations

import os
import shlex
import sys
from typing import Optional, Sequence

from experiments import cli
from experiments.sweep import programs
from rsst_jax import parallel


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = programs.build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    parallel.split_cpu()  # $RSST_JAX_CPU_DEVICES, before any JAX operation
    imports = [x for m in args.imports for x in ("--import", m)]
    resume = os.environ.get(programs.RESUME_ENV) or (
        cli.resume_command("experiments.run", imports + shlex.split(args.cell[0]))
        if len(args.cell) == 1 else "the sweep's command again")
    with programs.sigterm_as_interrupt():
        return cli.run_command(lambda: programs.train(programs.configs_of(args.cell)),
                               resume=resume, imports=args.imports)


if __name__ == "__main__":
    sys.exit(main())
