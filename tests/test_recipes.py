"""The docs' worked examples run as written; configuration files (issue 5, items 6 and 8).

``run_doc`` executes a Markdown page the way its readers are told to: a fenced block
whose first line is ``# file: NAME`` is saved as NAME; ``python`` blocks run in order
in one Python session; ``bash`` blocks are commands run from the same folder. Other
blocks (``sh``, ``text``, ...) are shown only. The page runs in its own process, so
networks or criteria it registers never leak into this one.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

from experiments import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```\s*$", re.S | re.M)

_DRIVER = textwrap.dedent("""
    import json, subprocess, sys
    blocks = json.load(open(sys.argv[1]))
    namespace = {"__name__": "__doc__"}
    for kind, code, where in blocks:
        print(f"--- {where}", flush=True)
        if kind == "python":
            exec(compile(code, where, "exec"), namespace)
            continue
        for command in code:
            print("$", command, flush=True)
            if command.startswith("python "):
                command = sys.executable + command[len("python"):]
            code_ = subprocess.run(command, shell=True).returncode
            if code_ != 0:
                sys.exit(f"{where}: exit code {code_} from: {command}")
""")


def doc_blocks(path: pathlib.Path) -> list[tuple[str, str, int]]:
    """(language, code, line number) of each fenced block of a Markdown file."""
    text = path.read_text()
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 2) for m in _FENCE.finditer(text)]


def bash_commands(code: str) -> list[str]:
    """Commands of a bash block: comments dropped, backslash continuations joined."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def run_doc(name: str, workdir: pathlib.Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run docs/NAME in ``workdir`` (see the module docstring); returns the finished process."""
    path = DOCS / name
    workdir.mkdir(parents=True, exist_ok=True)
    plan = []
    for lang, code, line in doc_blocks(path):
        where = f"docs/{name}:{line}"
        first = code.splitlines()[0] if code.strip() else ""
        if first.startswith("# file: "):
            (workdir / first[len("# file: "):].strip()).write_text(code)
        elif lang == "python":
            plan.append(("python", code, where))
        elif lang == "bash":
            plan.append(("bash", bash_commands(code), where))
    (workdir / "_doc_blocks.json").write_text(json.dumps(plan))
    (workdir / "_doc_driver.py").write_text(_DRIVER)
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(workdir)]
                                          + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return subprocess.run([sys.executable, "_doc_driver.py", "_doc_blocks.json"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_ran(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"


# --------------------------------------------------------------------------- docs


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("recipes")
    proc = run_doc("recipes.md", workdir)
    return workdir, proc


def test_recipes_page_runs_as_written(recipes):
    """Every block of docs/recipes.md, including the facts its Python blocks assert."""
    workdir, proc = recipes
    assert_ran(proc)
    cells = json.loads((workdir / "runs/recipes/sweep.json").read_text())["cells"]
    assert [(c["name"], c["status"]) for c in cells] == [
        ("variant=rates", "finished"), ("variant=filter", "finished"),
        ("variant=hessian_adaptive", "finished")]
    assert (workdir / "runs/recipes/comparison.md").read_text().count("| variant=") == 3


def test_replayed_config_is_the_saved_one(recipes):
    """--config of a finished run's config.json resolves to the same flags (save_dir aside)."""
    workdir, proc = recipes
    assert_ran(proc)
    first = json.loads((workdir / "runs/recipes/variant=filter/config.json").read_text())
    again = json.loads((workdir / "runs/replay/config.json").read_text())
    where = ("save_dir", "config")  # the replay's own folder, and the file it was given
    assert {k: v for k, v in first.items() if k not in where} == \
           {k: v for k, v in again.items() if k not in where}


def test_pretrained_page_runs_as_written(tmp_path):
    assert_ran(run_doc("pretrained.md", tmp_path))


def _commands(name: str, lang: str) -> list[list[str]]:
    return [shlex.split(cmd) for block_lang, code, _ in doc_blocks(DOCS / name) if block_lang == lang
            for cmd in bash_commands(code)]


def test_shown_sweeps_parse_and_plan(tmp_path, monkeypatch, capsys):
    """The full-size commands of docs/comparison.md are only shown; check they plan their cells."""
    from experiments import sweep

    monkeypatch.chdir(tmp_path)
    shown = [argv for argv in _commands("comparison.md", "sh") if argv[:3] == ["python", "-m", "experiments.sweep"]]
    assert len(shown) == 3
    cells = []
    for argv in shown:
        assert sweep.main(argv[3:] + ["--dry_run"]) == 0, capsys.readouterr().err
        cells.append(capsys.readouterr().out.count("python -m experiments.run "))
    assert cells == [3, 12, 8]
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_every_documented_command_line_parses():
    """Flags in the docs' commands exist (argparse would exit 2 on an unknown one)."""
    from experiments import analyze, compare, plot, sweep

    parsers = {"experiments.compare": compare.build_parser(), "experiments.plot": plot.build_parser(),
               "experiments.analyze": analyze.build_parser(), "experiments.sweep": sweep.build_parser(),
               "experiments.run": cli.run_parser()}
    seen = set()
    for name in ("comparison.md", "recipes.md", "pretrained.md"):
        for lang in ("bash", "sh"):
            for argv in _commands(name, lang):
                argv = argv[: argv.index(">")] if ">" in argv else argv
                if argv[:2] == ["python", "-m"]:
                    parsers[argv[2]].parse_args(argv[3:])
                    seen.add(argv[2])
                elif argv[:2] == ["python", "my_nets.py"]:
                    parsers["experiments.run"].parse_args(argv[2:])
    assert {"experiments.sweep", "experiments.compare", "experiments.plot", "experiments.analyze"} <= seen


# --------------------------------------------------------------------------- config files


def test_yaml_and_toml_supply_flags_and_the_command_line_wins(tmp_path):
    (tmp_path / "a.yaml").write_text("dataset: digits\nstruct: refill\nfillback_rate: 0.25\n"
                                     "epochs: 3\nwarmup: 0\nconv1: true\nreg_upper_limit: 2.5\n")
    (tmp_path / "a.toml").write_text('dataset = "digits"\nstruct = "none"\nrate = 0.3\n'
                                     'decreasing_lr = "2,4"\nprune_scope = "layerwise"\n')
    y = cli.parse_run_args(["--config", str(tmp_path / "a.yaml"), "--epochs", "7"]).to_dict()
    assert [y[k] for k in ("dataset", "struct", "fillback_rate", "epochs", "conv1",
                           "reg_upper_limit")] == ["digits", "refill", 0.25, 7, True, 2.5]
    assert y["lr"] == 0.01 and y["batch_size"] == 128  # defaults where neither says anything
    t = cli.parse_run_args(["--config", str(tmp_path / "a.toml"), "--rate", "0.1"])
    assert (t.prune.struct, t.prune.rate, t.optim.milestones, t.prune.prune_scope) == (
        "none", 0.1, (2, 4), "layerwise")


def test_saved_config_round_trips_through_parse_args(tmp_path):
    """A config.json as the run writes it resolves to the same Config."""
    cfg = cli.parse_run_args(
        ["--dataset", "digits", "--struct", "rsst", "--criteria", "l2", "--epochs", "2", "--warmup", "0",
         "--reg_upper_limit", "3", "--layer_rates", "layer1=0.5", "--save_dir", str(tmp_path / "a")])
    seed = cfg.run.resolved_seed
    saved = dict(cfg.to_dict(), seed=seed, resume=False, checkpoint=None)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    again = cli.parse_run_args(["--config", str(tmp_path / "config.json")])
    assert dict(again.to_dict(), config=None, seed=seed) == dict(cfg.to_dict(), seed=seed)


def test_bad_config_files_are_one_clear_line(tmp_path, capsys):
    from experiments import run as run_cmd

    (tmp_path / "bad.yaml").write_text("dataset: digits\nepoch: 3\n")
    assert run_cmd.main(["--config", str(tmp_path / "bad.yaml"), "--save_dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown keys epoch" in err[0]
