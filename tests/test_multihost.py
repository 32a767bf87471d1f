"""One run over several processes (jax.distributed): two CPU processes on localhost train
what one process with two CPU devices trains, process 0 alone writes the run's files,
and a run stopped in both processes resumes in both."""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import pytest

from experiments import run as run_cli

ROOT = pathlib.Path(__file__).resolve().parent.parent

# experiments.run on the tests' tiny data set and network (tests/tiny.py).
_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import tiny
    from rsst_jax import data as data_lib
    ds = tiny.tiny_digits(320)
    data_lib.load_dataset = lambda name, data_dir=None, seed=0: ds
    from experiments import run
    sys.exit(run.main(sys.argv[1:]))
""").format(tests=str(ROOT / "tests"))

FLAGS = ["--dataset", "digits", "--arch", "tiny_cnn", "--epochs", "2", "--batch_size", "64",
         "--lr", "0.1", "--warmup", "0", "--decreasing_lr", "100", "--pruning_times", "2",
         "--eval_batch_size", "100", "--struct", "rsst", "--criteria", "remain",
         "--prune_method", "random", "--rate", "0.5"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "RSST_JAX_CPU_DEVICES", "RSST_JAX_STOP_AFTER")
           and not k.startswith("SLURM_")}
    return dict(env, JAX_PLATFORMS="cpu", **extra)


def _one(save, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CHILD, *FLAGS, "--save_dir", str(save)],
                          cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=600)


def _two(save, *extra, **env) -> list[subprocess.CompletedProcess]:
    """Both ranks of a two-process run; a rank whose peer never comes aborts after JAX's
    initialization timeout, so each runs under a timeout of its own."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, *FLAGS, "--save_dir", str(save),
                               "--coordinator_address", f"127.0.0.1:{port}",
                               "--num_processes", "2", "--process_id", str(i), *extra],
                              cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def _numbers(save) -> list[dict]:
    rows = json.loads((pathlib.Path(save) / "summary.json").read_text())
    return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in rows]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_two_devices_and_resume(tmp_path):
    """Stopped after its third checkpoint in both processes (RSST_JAX_STOP_AFTER, exit 75),
    then resumed in both, a two-process run ends with the summary of one process holding
    two CPU devices; process 1 prints nothing of the run and writes no file of its own."""
    one = _one(tmp_path / "one", RSST_JAX_CPU_DEVICES="2")
    assert one.returncode == 0, one.stderr[-3000:]
    # the start line and the summary say where the ticket trained
    assert "1 ticket(s) on batches split over 2 devices (cpu)" in one.stdout, one.stdout[:2000]
    assert [r["devices"] for r in _numbers(tmp_path / "one")] == [2, 2]

    stopped = _two(tmp_path / "two", RSST_JAX_STOP_AFTER="3")
    assert [p.returncode for p in stopped] == [75, 75], [p.stderr[-2000:] for p in stopped]
    assert not (tmp_path / "two" / "summary.json").exists() or \
        len(_numbers(tmp_path / "two")) < 2
    resumed = _two(tmp_path / "two", "--resume")
    assert [p.returncode for p in resumed] == [0, 0], [p.stderr[-2000:] for p in resumed]
    assert "resuming" in resumed[0].stdout and "round 1:" in resumed[0].stdout
    assert "round" not in resumed[1].stdout and "done:" not in resumed[1].stdout

    assert _numbers(tmp_path / "two") == _numbers(tmp_path / "one")
    assert len(_numbers(tmp_path / "one")) == 2
    # one line per epoch in log.jsonl: only process 0 wrote it
    lines = (tmp_path / "two" / "log.jsonl").read_text().splitlines()
    epochs = [(json.loads(x)["round"], json.loads(x)["epoch"]) for x in lines if x.strip()]
    assert sorted(set(epochs)) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert len(epochs) == len(set(epochs))
    assert not (tmp_path / "two" / "run.lock").exists()


@pytest.mark.parametrize("argv, message", [
    (["--num_processes", "2"], "need --coordinator_address"),
    (["--process_id", "1"], "need --coordinator_address"),
    (["--coordinator_address", "nohost", "--num_processes", "2", "--process_id", "0"],
     "--coordinator_address wants HOST:PORT"),
    (["--coordinator_address", "127.0.0.1:1234", "--process_id", "0"],
     "needs --num_processes"),
    (["--coordinator_address", "127.0.0.1:1234", "--num_processes", "2", "--process_id", "2"],
     "--process_id must be 0 .. 1"),
    (["--num_processes", "two"], "argument --num_processes: invalid int value"),
])
def test_bad_process_flags_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
    code = run_cli.main(["--dataset", "digits", "--save_dir", str(tmp_path / "r"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "r").exists()


def test_process_flags_are_in_help_and_not_in_the_configuration(capsys):
    from experiments import cli
    with pytest.raises(SystemExit):
        cli.parse_run_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--coordinator_address", "--num_processes", "--process_id"):
        assert flag in text
    argv = ["--dataset", "digits", "--coordinator_address", "10.0.0.1:99", "--num_processes",
            "4", "--process_id", "3"]
    assert cli.host_values(argv) == {"coordinator_address": "10.0.0.1:99", "num_processes": 4,
                                     "process_id": 3}
    cfg = cli.parse_run_args(argv)
    assert "process_id" not in cfg.to_dict() and cfg.data.dataset == "digits"


def test_a_slurm_step_of_several_tasks_is_detected(monkeypatch):
    from rsst_jax import parallel
    for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert parallel.slurm_tasks() == 1  # an sbatch script, not an srun task
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert parallel.slurm_tasks() == 4
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")  # the step's own count wins
    assert parallel.slurm_tasks() == 2
