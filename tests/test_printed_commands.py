"""Every command a tool prints works when pasted (issue 26, item 3).

Each printed command is pasted as printed into a fresh shell (``bash -c``) in the folder
the tool ran in, which is not the repository, with an environment that has no
PYTHONPATH: the resume line after Ctrl-C of a run and of a sweep (and the same line in a
sweep cell's run.log), the ``next:`` commands of a finished run, the commands of a
sweep's cells (``--dry_run``), the ``(see ... --help)`` of bad input, and
``scripts/clusters.py --help``. The tools run with the user's module (``--import tiny``,
the tests' network) on PYTHONPATH only, so a printed command works only where it carries
what it needs (the interpreter, ``PYTHONPATH=...``). A command that would train for long
gets ``--dry_run``; the rest run as printed, on the tiny network for one epoch. The
``--detach`` line of a SLURM sweep is pasted in tests/test_cluster_sweep.py.
"""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from rsst_jax import checkpoint as ckpt
from rsst_jax import paths

from test_commands import TINY_BASE

ROOT = pathlib.Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
FLAGS = TINY_BASE + " --epochs 3 --pruning_times 1 --struct none --batch_size 256"

pytestmark = pytest.mark.slow


def tool_env() -> dict:
    """How the tools run: the tests' module ``tiny`` (tiny_cnn) found only through
    PYTHONPATH; rsst-jax itself is installed in the interpreter's environment."""
    return dict(os.environ, JAX_PLATFORMS="cpu", TQDM_DISABLE="1", PYTHONPATH=str(TESTS),
                JAX_COMPILATION_CACHE_DIR=str(ROOT / ".jax_cache"))


def paste(line: str, cwd: pathlib.Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``line`` typed into a new shell in ``cwd``, with no PYTHONPATH."""
    env = {k: v for k, v in tool_env().items() if k != "PYTHONPATH"}
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def tool(module: str, argv: list, cwd: pathlib.Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *argv], cwd=cwd, env=tool_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def interrupted(proc: subprocess.Popen, save: pathlib.Path) -> str:
    """Ctrl-C once ``save`` has its first checkpoint; the command the tool says resumes."""
    start = time.time()
    while ckpt.latest_step(paths.RunPaths.of(save).checkpoints) is None:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < 240, "no checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted; resume with: "), err[-3000:]
    return last[len("interrupted; resume with: "):]


def test_printed_commands_of_a_run_work_when_pasted(tmp_path):
    """The resume line (with the interpreter and the PYTHONPATH of --import tiny) finishes
    the run; the next: commands it then prints read the run."""
    proc = tool("experiments.run", ["--import", "tiny", *FLAGS.split(), "--save_dir", "run"],
                tmp_path)
    resume = interrupted(proc, tmp_path / "run")
    assert resume.startswith(f"PYTHONPATH={TESTS} {sys.executable} -m experiments.run "), resume
    done = paste(resume, tmp_path)
    assert done.returncode == 0, (resume, done.stderr[-3000:])
    assert len(paths.RunPaths.of(tmp_path / "run").summary_json.read_text()) > 2
    nxt = [x for x in done.stdout.splitlines() if x.startswith("next: ")][-1][len("next: "):]
    commands = [c.strip() for c in nxt.split("  |  ")]
    assert [c.split(" -m ")[1].split()[0] for c in commands] == [
        "experiments.compare", "experiments.plot", "experiments.analyze"], commands
    for command in commands:
        ran = paste(command, tmp_path)
        assert ran.returncode == 0, (command, ran.stderr[-3000:])


def test_printed_commands_of_a_sweep_work_when_pasted(tmp_path):
    """The resume line of an interrupted sweep (also in its cell's run.log) plans the rest
    when pasted with --dry_run; each cell's command from --dry_run is a valid run
    (pasted with --dry_run: it would train); the hint of bad input shows the help."""
    argv = ["--out", "s", "--import", "tiny", "--base", FLAGS, "--grid", "seed=0",
            "--no_compare"]
    resume = interrupted(tool("experiments.sweep", argv, tmp_path), tmp_path / "s" / "seed=0")
    assert resume.startswith(f"PYTHONPATH={TESTS} {sys.executable} -m experiments.sweep "), resume
    log = paths.RunPaths.of(tmp_path / "s" / "seed=0").output.read_text()
    assert f"interrupted; resume with: {resume}" in log, log[-2000:]
    planned = paste(resume + " --dry_run", tmp_path)
    assert planned.returncode == 0, planned.stderr[-3000:]
    assert "seed=0  partial" in planned.stdout, planned.stdout
    cells = [x for x in planned.stdout.splitlines() if " -m experiments.run " in x]
    assert len(cells) == 1 and "--resume" in cells[0].split(), planned.stdout
    checked = paste(cells[0] + " --dry_run", tmp_path)
    assert checked.returncode == 0, (cells[0], checked.stderr[-3000:])
    assert "resumes from" in checked.stdout, checked.stdout

    for argv, module in ((["--out", "t", "--grid", "epochs=ten"], "experiments.run"),
                         (["--out", "t", "--gird", "seed=0"], "experiments.sweep")):
        bad = tool("experiments.sweep", argv, tmp_path)
        _, err = bad.communicate(timeout=120)
        assert bad.returncode == 2 and "(see " in err, err
        hint = err.rsplit("(see ", 1)[1].rsplit(")", 1)[0]
        assert hint.endswith(f" -m {module} --help"), hint
        shown = paste(hint, tmp_path)
        assert shown.returncode == 0 and f"usage: python -m {module}" in shown.stdout, \
            (hint, shown.stderr[-2000:])


def test_clusters_script_has_a_help(tmp_path):
    """scripts/clusters.py --help prints its usage and exits 0; a wrong word exits 2."""
    script = ROOT / "scripts" / "clusters.py"
    shown = paste(f"{sys.executable} {script} --help", tmp_path)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: "), shown
    for word in ("slurm", "ray", "start", "stop", "DIR"):
        assert word in shown.stdout, shown.stdout
    wrong = paste(f"{sys.executable} {script} slurm begin {tmp_path}", tmp_path)
    assert wrong.returncode == 2 and "invalid choice: 'begin'" in wrong.stderr, wrong
    assert not any(tmp_path.iterdir())
