"""The edges of every command: help texts, one exit-code contract, one ticket loader,
sweeps that vary configurations and train groupable cells as one program, Ctrl-C.

Bad input to any command exits 2 with exactly one line on stderr saying what to do; a
damaged checkpoint is bad input too, named by its path. Ctrl-C ends a run or a sweep
within seconds (also while XLA compiles) with one line naming the command that resumes,
and that command ends with the numbers of an uninterrupted run.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import pathlib
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import analyze, bench, cli, compact, compare, plot, sweep
from rsst_jax import checkpoint as ckpt
from rsst_jax import data as data_lib
from rsst_jax import masks as masks_lib
from rsst_jax import methods, paths, runlock, tickets

import tiny

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY_BASE = ("--dataset digits --arch tiny_cnn --batch_size 64 --lr 0.1 --warmup 0 "
             "--decreasing_lr 100 --eval_batch_size 100")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished RSST run of the tiny network: 2 rounds of 1 epoch."""
    root = tmp_path_factory.mktemp("tiny") / "run"
    with pytest.MonkeyPatch.context() as mp:
        tiny.use_tiny_data(mp)
        tiny.quiet_run(tiny.tiny_config(root, struct="rsst", criteria="l1", pruning_times=2,
                                        epochs=1))
    return root


def outcome(main, argv, capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``main(argv)`` called here (argparse's errors exit)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def shell(command: str, cwd, **env) -> subprocess.Popen:
    """``python -m experiments.<command>`` started in ``cwd`` (tiny_cnn importable)."""
    environ = dict(os.environ, JAX_PLATFORMS="cpu", TQDM_DISABLE="1", **env,
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    return subprocess.Popen([sys.executable, "-m", *shlex.split(command)], cwd=cwd, env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def whole_and_killed(flags: str, cwd) -> dict:
    """``experiments.run FLAGS`` twice in ``cwd``: "whole" straight through, and "killed"
    with SIGKILL once round 1's first epoch is in its log.jsonl, then resumed. Each name
    -> [summary rows, epoch rows], without the times (``*time_s``)."""
    runs = {}
    for name, kill in (("whole", False), ("killed", True)):
        proc = shell(f"experiments.run {flags} --save_dir {name}", cwd)
        if kill:
            log = cwd / name / "log.jsonl"
            deadline = time.time() + 900
            while time.time() < deadline and proc.poll() is None and not (
                    log.is_file() and '"round": 1' in log.read_text()):
                time.sleep(0.2)
            proc.kill()
            proc.communicate(timeout=60)
            assert '"round": 1, "epoch": 1' in log.read_text()
            proc = shell(f"experiments.run {flags} --save_dir {name} --resume", cwd)
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        runs[name] = [[{k: v for k, v in r.items() if not k.endswith("time_s")} for r in rows]
                      for rows in (json.loads((cwd / name / "summary.json").read_text()),
                                   [json.loads(x) for x in (cwd / name / "log.jsonl")
                                    .read_text().splitlines()])]
    return runs


def read_back(method_import: str, net_import: str, cwd) -> str:
    """compare (of "whole" and "killed"), plot, analyze and compact on the runs of
    :func:`whole_and_killed` in ``cwd``, each exiting 0; returns compare's output. The
    method's module is imported with ``method_import``, the network's with
    ``net_import`` (compare needs only the method's)."""
    both = f"{method_import} {net_import}".strip()
    compare = None
    for command in (f"experiments.compare {method_import} whole killed",
                    f"experiments.plot {both} whole",
                    f"experiments.analyze {both} whole",
                    f"experiments.compact {both} whole --out small --runs 1 "
                    "--batch_sizes 1 --eval_images 16"):
        proc = shell(command, cwd)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (command, err[-2000:])
        compare = out if compare is None else compare
    return compare


def finish_all(procs: dict) -> dict:
    return {name: (p.wait(timeout=300), p.communicate()[1]) for name, p in procs.items()}


# --------------------------------------------------------------------------- help


PARSERS = {"run": cli.run_parser, "sweep": sweep.build_parser, "bench": bench.build_parser,
           "compact": compact.build_parser, "compare": compare.build_parser,
           "plot": plot.build_parser, "analyze": analyze.build_parser}


def help_entries(text: str) -> dict[str, str]:
    """Option string -> its help text, from argparse's formatted help."""
    entries, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (-\S+|[A-Z_]+)(.*)$", line)
        if m:
            current = m.group(1).rstrip(",")
            entries[current] = m.group(2).strip()
        elif current is not None and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_help_has_a_text_and_one_default_per_flag(name):
    parser = PARSERS[name]()
    text = parser.format_help()
    assert "``" not in text  # no reStructuredText literals
    entries = help_entries(text)
    for action in parser._actions:
        if not action.option_strings or "--help" in action.option_strings:
            continue
        flag = action.option_strings[0]
        assert (action.help or "").strip(), f"{name} {flag} has no help text"
        said = entries[flag]
        defaults = said.count("(default") + said.count("when not given")
        assert defaults == (0 if action.required else 1), f"{name} {flag}: {said}"


# --------------------------------------------------------------------------- bad input


BAD_INPUT = [  # (command, argv with {run} {tmp} {file}, what the line says)
    ("sweep", ["--out", "{tmp}/s"], "empty sweep"),
    ("sweep", ["--out", "{tmp}/s", "--grid", "struct=none", "--base", "--save_dir x"],
     "--base must not set --save_dir"),
    ("sweep", ["--out", "{tmp}/s", "--grid", "stuct=none"], "did you mean struct"),
    ("sweep", ["--out", "{tmp}/s", "--grid", "epochs=ten"], "--grid epochs: argument --epochs: invalid int"),
    ("sweep", ["--out", "{tmp}/s", "--grid", "conv1=maybe"], "--conv1 is a switch; use conv1=true,false"),
    ("sweep", ["--out", "{tmp}/s", "--grid", "struct=none,rsst", "--base", "--prune_method filter"],
     "cell struct=rsst: --struct rsst with --prune_method filter makes no sense"),
    ("sweep", ["--out", "{tmp}/s", "--grid", "seed=1", "--parallel", "0"], "--parallel must be >= 1"),
    ("sweep", ["--out", "{tmp}/s", "--grid", "seed=1", "--import", "no_such_module_x"],
     "--import no_such_module_x"),
    ("sweep", ["--out", "{tmp}/s", "--variant", "a=--resume"], "--variant a must not set --resume"),
    ("sweep", ["--grid", "seed=1"], "the following arguments are required: --out"),
    ("compact", ["{run}", "--out", "{file}"], "is a file; give a new or existing directory"),
    ("compact", ["{tmp}/missing", "--out", "{tmp}/c"], "missing: no such directory"),
    ("compact", ["{run}", "--out", "{tmp}/c", "--runs", "0"], "must be at least 1"),
    ("compact", ["{run}", "--out", "{tmp}/c"], "tiny_cnn cannot be compacted: no compaction rebuilder"),
    ("compare", ["{tmp}"], "is not an rsst-jax run directory"),
    ("compare", ["{run}", "--levels", "abc"], "--levels wants comma-separated percentages"),
    ("compare", ["{run}", "--names", "a,b"], "--names has 2 names for 1 runs"),
    ("compare", ["{run}", "--metric", "acc"], "argument --metric: invalid choice"),
    ("plot", ["{run}", "--only", "pie"], "--only takes some of rounds, method, channels, epochs"),
    ("plot", ["{run}", "--out", "{file}"], "cannot write"),
    ("analyze", ["{run}", "--input_shape", "1,2"], "--input_shape wants H,W,C"),
    ("analyze", ["{run}", "--dataset", "imagenet"], "unknown --dataset 'imagenet'"),
    ("analyze", ["{run}", "--round", "7"], "has no final checkpoint of round 7"),
    ("analyze", ["{run}", "--arch", "res20s"], "does not fit res20s"),
    ("analyze", ["{run}/config.json"], "is a file"),
]
MAINS = {"sweep": sweep.main, "compact": compact.main, "compare": compare.main,
         "plot": plot.main, "analyze": analyze.main}


@pytest.mark.parametrize("command,argv,message", BAD_INPUT,
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(BAD_INPUT)])
def test_bad_input_is_one_line_and_exit_2(command, argv, message, tiny_run, tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("a file")
    argv = [a.format(run=tiny_run, tmp=tmp_path, file=file) for a in argv]
    code, err = outcome(MAINS[command], argv, capsys)
    assert code == 2, (code, err)
    assert message in one_error_line(err)
    assert file.read_text() == "a file"
    assert not (tmp_path / "s").exists() and not (tmp_path / "c").exists()


def test_bad_input_from_the_shell(tiny_run, tmp_path):
    """The same through ``python -m``: exit 2, one line, nothing written; among them
    ``compact RUN --out README.md`` next to an existing README.md."""
    (tmp_path / "README.md").write_text("# my notes\n")
    procs = {
        "compact": shell(f"experiments.compact {tiny_run} --out README.md", tmp_path),
        "sweep": shell("experiments.sweep --out s --grid seed=1 --base '--epochs 0'", tmp_path),
        "compare": shell("experiments.compare .", tmp_path),
        "plot": shell(f"experiments.plot {tiny_run} --only x", tmp_path),
        "analyze": shell("experiments.analyze README.md", tmp_path),
    }
    done = finish_all(procs)
    for name, needle in (("compact", "--out README.md is a file"),
                         ("sweep", "cell seed=1: --epochs must be >= 1"),
                         ("compare", "is not an rsst-jax run directory"),
                         ("plot", "--only takes some of"), ("analyze", "README.md is a file")):
        code, err = done[name]
        assert code == 2 and needle in one_error_line(err), (name, code, err)
    assert (tmp_path / "README.md").read_text() == "# my notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_compare_without_out_writes_nothing(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert compare.main([str(tiny_run)]) == 0
    assert "RSST" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    assert compare.main([str(tiny_run), "--out", "table"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv", "table.md"]


def _corrupt_arrays(step: pathlib.Path) -> None:
    rng = random.Random(0)
    for f in (step / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # orbax's data files (OCDBT)
            f.write_bytes(bytes(rng.randrange(256) for _ in range(f.stat().st_size)))


def test_damaged_round_checkpoint_is_one_line_naming_it(tiny_run, tmp_path):
    """analyze, compact and plot on a run whose round_1/final checkpoint was damaged
    (data overwritten with random bytes; meta/metadata removed): exit 2, one line."""
    runs = {}
    for damage in ("arrays", "meta"):
        run = tmp_path / damage
        shutil.copytree(tiny_run, run)
        step = paths.RunPaths.of(run).final(1) / str(ckpt.latest_step(paths.RunPaths.of(run).final(1)))
        if damage == "arrays":
            _corrupt_arrays(step)
        else:
            (step / "meta" / "metadata").unlink()
        runs[damage] = (run, step)
    procs = {}
    for damage, (run, _) in runs.items():
        procs[("analyze", damage)] = shell(f"experiments.analyze {run}", tmp_path)
        procs[("compact", damage)] = shell(f"experiments.compact {run} --out {tmp_path}/c_{damage}",
                                           tmp_path)
        procs[("plot", damage)] = shell(f"experiments.plot {run} --out {tmp_path}/p_{damage}",
                                        tmp_path)
    for (command, damage), (code, err) in finish_all(procs).items():
        line = one_error_line(err)
        assert code == 2 and str(runs[damage][1]) in line, (command, damage, line)
        assert ("no meta/metadata" if damage == "meta" else "cannot restore") in line, line


# --------------------------------------------------------------------------- tickets


def test_ticket_loader_opens_every_kind_of_path(tiny_run):
    run = paths.RunPaths.of(tiny_run)
    last = tickets.load(tiny_run)
    assert (last.ref.kind, last.ref.round) == ("final", 1)
    raw, meta = ckpt.restore_raw(run.final(1))
    assert last.meta == meta and last.network.sources["image_shape"] == "checkpoint"
    assert (last.network.arch, last.network.dataset, last.network.num_classes,
            last.network.image_shape, last.network.options) == ("tiny_cnn", "digits", 10, (8, 8, 1), {})
    for a, b in zip(jax.tree_util.tree_leaves(raw["params"]), jax.tree_util.tree_leaves(last.params)):
        np.testing.assert_array_equal(a, b)
    assert masks_lib.tree_paths(last.masks) == masks_lib.tree_paths(last.params)
    assert 100 * masks_lib.density(last.masks) == pytest.approx(
        json.loads(run.summary_json.read_text())[1]["remaining_weight_pct"], abs=1e-9)
    logits = last.model.apply(last.variables, np.zeros((2, 8, 8, 1), np.float32), train=False)
    assert logits.shape == (2, 10)
    # a round folder, a step folder, the best-validation weights (their metadata names
    # the network too), W0 (no masks)
    assert tickets.load(run.round_dir(0)).ref.round == 0
    step = run.final(0) / str(ckpt.latest_step(run.final(0)))
    assert tickets.load(step).ref.path == step
    best = tickets.load(tiny_run, round_idx=0, kind="best")
    assert best.ref.kind == "best" and best.network.sources["arch"] == "checkpoint"
    init = tickets.load(run.init())
    assert init.ref.kind == "init" and init.masks is None and init.model is not None
    # a resume checkpoint of an RSST round holds its channel masks S besides M
    resume = tickets.load(run.checkpoints / "3")
    assert resume.ref.kind == "resume" and resume.meta["has_channel_masks"]
    assert masks_lib.density(resume.channel_masks) < masks_lib.density(resume.masks)
    assert last.channel_masks is None


def test_older_checkpoints_fall_back_to_the_data_sets_image_shape(tiny_run, tmp_path):
    alone = tmp_path / "alone"
    shutil.copytree(paths.RunPaths.of(tiny_run).final(1), alone)  # out of its run
    step = alone / str(ckpt.latest_step(alone))
    meta_file = step / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    for key in ("image_shape", "model_options"):  # what checkpoints of rsst-jax 0.1 lack
        meta.pop(key)
    meta_file.write_text(json.dumps(meta))
    ticket = tickets.load(alone)
    assert ticket.network.image_shape == data_lib.IMAGE_SHAPES["digits"] == (32, 32, 1)
    assert ticket.network.sources["image_shape"] == "data set"
    for key in ("arch", "dataset", "num_classes"):
        meta.pop(key)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(tickets.TicketError, match="arch and image_shape"):
        tickets.load(alone)
    anonymous = tickets.load(alone, need_model=False)
    assert anonymous.model is None and anonymous.network.num_classes == 10  # from the arrays
    named = tickets.load(alone, arch="tiny_cnn", dataset="fashion_mnist")
    assert named.network.image_shape == (28, 28, 1) and named.network.sources["arch"] == "--arch"


def test_one_table_of_image_shapes_and_run_paths_from_one_module():
    assert list(data_lib.IMAGE_SHAPES) == list(data_lib.DATASETS)
    assert data_lib.load_dataset("digits").image_shape == data_lib.IMAGE_SHAPES["digits"]
    names = {paths.CONFIG, paths.CHECKPOINTS, paths.LOG, paths.SUMMARY_JSON, paths.SUMMARY_CSV,
             paths.LOCK, paths.OUTPUT, paths.PLOTS, paths.ROUND_PREFIX}
    sweep_files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "experiments" / "sweep").glob("*.py"))
    for rel in ("rsst_jax/runs.py", "rsst_jax/tickets.py", "rsst_jax/pretrained.py",
                "experiments/analyze.py", "experiments/compact.py", "experiments/plot.py",
                "experiments/compare.py", *sweep_files):
        tree = ast.parse((ROOT / rel).read_text())
        literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
                    and isinstance(n.value, str)}
        assert not literals & names, (rel, literals & names)
        assert not re.search(r"IMAGE_SIZES|INPUT_SHAPES|\(64, 64, 3\)", (ROOT / rel).read_text()), rel


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("argv", [
    [],
    ["--dataset", "digits", "--seed", "3", "--lr", "0.05", "--conv1", "--no-mask_bn"],
    ["--struct", "refill", "--fillback_rate", "0.1", "--layer_rates", "layer1=0.5,layer3=2",
     "--reg_upper_limit", "1e-05", "--mask_bn", "--save_dir", "a dir/x"],
    ["--prune_type", "rewind_lt", "--rewind_epoch", "3", "--rate_schedule", "1,0.5", "--seed", "0"],
])
def test_config_argv_is_the_inverse_of_parsing(argv):
    cfg = cli.parse_run_args(argv)
    again = cli.config_argv(cfg)
    assert cli.parse_run_args(again) == cfg
    assert cli.config_argv(cli.parse_run_args(again)) == again


def test_flag_values_read_as_the_command_line_does():
    assert cli.flag_value("lr", "0.2") == 0.2 and cli.flag_value("seed", "7") == 7
    assert cli.flag_value("conv1", "true") is True and cli.flag_value("conv1", "off") is False
    assert cli.flag_value("mask_bn", "none") is None
    assert cli.flag_value("layer_rates", "layer1=0.5,layer2=2") == "layer1=0.5,layer2=2"
    for name, text, needle in (("epochs", "ten", "invalid int value"),
                               ("prune_scope", "lots", "invalid choice"),
                               ("conv1", "maybe", "is a switch"), ("nope", "1", "no flag --nope")):
        with pytest.raises(cli.ConfigError, match=needle):
            cli.flag_value(name, text)


def test_programs_of_a_sweep(tmp_path):
    """Which cells share a training call: groupable differences only, the same status,
    unfinished ones at most one checkpoint apart; --no-group: one each."""
    base = shlex.split(TINY_BASE + " --pruning_times 2 --epochs 1")
    cells = sweep.plan(tmp_path, base, ["struct=none,rsst", "seed=0,1,2", "lr=0.1,0.2"], [])
    programs = sweep.plan_programs(cells)
    assert [[c.name for c in p] for p in programs] == [
        [c.name for c in cells if c.cfg.prune.struct == s] for s in ("none", "rsst")]
    assert [len(p) for p in sweep.plan_programs(cells, grouped=False)] == [1] * 12
    for c, (status, step) in zip(cells[:6], [("partial", 4), ("partial", 5), ("partial", 7),
                                             ("done", None), ("stale", None), ("new", None)]):
        c.status, c.resume_step = status, step
    programs = sweep.plan_programs(cells[:6])
    assert [[cells.index(c) for c in p] for p in programs] == [[0, 1], [2], [5]]
    seeds = sweep.plan(tmp_path, base + ["--num_seeds", "2"], ["lr=0.1,0.2"], [])
    assert [len(p) for p in sweep.plan_programs(seeds)] == [1, 1]  # one program each already


# --------------------------------------------------------------------------- sweeps


@pytest.mark.slow
def test_sweep_trains_groupable_cells_as_one_program(tmp_path, monkeypatch, capsys):
    """A sweep over seeds and learning rates is one driver.run of 4 tickets; each cell
    writes its own run, with the masks of training it alone (--no-group) exactly (random
    pruning and the 'remain' criterion do not depend on float rounding), the same sparsity
    and accuracies within what rounding moves; run again, it trains nothing."""
    from rsst_jax import driver
    tiny.use_tiny_data(monkeypatch)
    calls, real = [], driver.run

    def counted(configs, **kw):
        calls.append([pathlib.Path(c.run.save_dir).name for c in configs])
        return real(configs, **kw)
    monkeypatch.setattr(driver, "run", counted)
    base = TINY_BASE + (" --pruning_times 2 --epochs 2 --struct rsst --criteria remain "
                        "--prune_method random --rate 0.5")
    argv = ["--mode", "inprocess", "--base", base, "--grid", "seed=3,4", "--grid", "lr=0.1,0.05",
            "--no_compare"]
    assert sweep.main(["--out", str(tmp_path / "grouped")] + argv) == 0
    names = ["seed=3,lr=0.1", "seed=3,lr=0.05", "seed=4,lr=0.1", "seed=4,lr=0.05"]
    assert calls == [names]
    assert "as one program (4 tickets)" in capsys.readouterr().out
    record = json.loads((tmp_path / "grouped" / sweep.RECORD).read_text())
    assert [(c["name"], c["status"], c["program"]) for c in record["cells"]] == \
           [(n, "finished", 0) for n in names]
    calls.clear()
    assert sweep.main(["--out", str(tmp_path / "alone"), "--no-group"] + argv) == 0
    assert calls == [[n] for n in names]
    for name in names:
        a = json.loads((tmp_path / "grouped" / name / paths.SUMMARY_JSON).read_text())
        b = json.loads((tmp_path / "alone" / name / paths.SUMMARY_JSON).read_text())
        assert len(a) == len(b) == 2
        for ra, rb in zip(a, b):
            for key in ("remaining_weight_pct", "channel_sparsity_pct", "best_val_epoch"):
                assert ra[key] == rb[key], (name, key)
            for key in ("final_test_acc", "best_val_acc", "acc_before_s"):
                if key in ra:  # equal here; a rounding-sized change may flip an image or two
                    assert abs(ra[key] - rb[key]) <= 3.0, (name, key, ra[key], rb[key])
            if "target_norm_rel" in ra:
                assert ra["target_norm_rel"] == pytest.approx(rb["target_norm_rel"], rel=1e-4)
        for r in (0, 1):
            ma = tickets.read(tmp_path / "grouped" / name / f"round_{r}" / "final")[0]["masks"]
            mb = tickets.read(tmp_path / "alone" / name / f"round_{r}" / "final")[0]["masks"]
            for x, y in zip(jax.tree_util.tree_leaves(ma), jax.tree_util.tree_leaves(mb)):
                np.testing.assert_array_equal(x, y)
    calls.clear()
    assert sweep.main(["--out", str(tmp_path / "grouped")] + argv) == 0
    assert calls == [] and "4 of 4 cells finished" in capsys.readouterr().out


# --------------------------------------------------------------------------- Ctrl-C


BOOT = r"""
import os, sys
import numpy as np
sys.path.insert(0, os.environ["RSST_TEST_DIR"])
import tiny  # registers tiny_cnn
from rsst_jax import data as data_lib
with np.load(os.environ["RSST_TEST_DATA"]) as f:
    _ds = data_lib.Dataset(name="tiny_digits", num_classes=10, flip=False,
                           mean=tuple(f["mean"]), std=tuple(f["std"]),
                           **{k: f[k] for k in f.files if k not in ("mean", "std")})
data_lib.load_dataset = lambda name, data_dir=None, seed=0: _ds
"""


def _interrupt(proc, ready, what: str) -> tuple[float, str]:
    """Wait for ``ready()``, send SIGINT; (seconds to exit, stderr)."""
    deadline = time.time() + 240
    while not ready():
        assert proc.poll() is None and time.time() < deadline, (what, proc.communicate())
        time.sleep(0.005)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return time.time() - sent, err


@pytest.mark.slow
def test_ctrl_c_names_the_resume_command_and_resume_finishes_the_run(tmp_path):
    from test_reliability import TINY_FLAGS, read_rows, run_child, start_child, strip_times
    flags = TINY_FLAGS + ["--struct", "rsst", "--criteria", "l1", "--pruning_times", "2",
                          "--epochs", "2"]
    reference = run_child(flags + ["--save_dir", str(tmp_path / "reference")])
    assert reference.returncode == 0, reference.stderr[-3000:]
    save = tmp_path / "run"
    checkpoints = paths.RunPaths.of(save).checkpoints
    argv = flags + ["--save_dir", str(save)]
    line = (f"interrupted; resume with: {paths.python_command(ROOT)} -m experiments.run "
            f"{shlex.join(argv)} --resume")

    # While XLA compiles the first epoch's program (an empty cache: nothing to load).
    proc = start_child(argv, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cold_cache"))
    started = []

    def compiling():
        if not started:
            text = proc.stdout.readline()
            if "Compiling" in text:
                started.append(time.time())
            return False
        return time.time() - started[0] > 0.5
    seconds, err = _interrupt(proc, compiling, "compiling")
    assert proc.returncode == 130 and err.strip().splitlines() == [line], err
    assert seconds < 3.0, seconds
    assert ckpt.latest_step(checkpoints) is None  # it was still in the first epoch
    with runlock.RunLock(save):  # no run holds it
        pass

    # After the first checkpoint: the command it named resumes, and is stopped again.
    proc = start_child(argv + ["--resume"])
    seconds, err = _interrupt(proc, lambda: ckpt.latest_step(checkpoints) is not None, "checkpoint")
    assert proc.returncode == 130 and err.strip().splitlines() == [line], err
    assert seconds < 3.0, seconds
    tree, meta = ckpt.restore_raw(checkpoints)  # the newest checkpoint is intact
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(tree["state"]))

    done = run_child(argv + ["--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert strip_times(read_rows(paths.RunPaths.of(save).summary_json)) == \
           strip_times(read_rows(paths.RunPaths.of(tmp_path / "reference").summary_json))


@pytest.mark.slow
def test_ctrl_c_stops_a_sweep_and_its_cells_and_the_same_command_resumes(tmp_path):
    from test_reliability import child_env
    (tmp_path / "tinyboot.py").write_text(BOOT)
    argv = ["--out", "out", "--import", "tinyboot", "--base",
            TINY_BASE + " --pruning_times 2 --epochs 2 --struct none", "--grid", "seed=0,1",
            "--no_compare"]
    env = child_env(PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]))
    start = lambda: subprocess.Popen(  # noqa: E731
        [sys.executable, "-m", "experiments.sweep", *argv], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cells = [tmp_path / "out" / f"seed={s}" for s in (0, 1)]
    proc = start()
    seconds, err = _interrupt(proc, lambda: any(
        ckpt.latest_step(paths.RunPaths.of(c).checkpoints) is not None for c in cells), "sweep")
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [
        f"interrupted; resume with: {paths.python_command(tmp_path)} -m experiments.sweep "
        f"{shlex.join(argv)}"], err
    assert seconds < 3.0, seconds
    for c in cells:  # the cells' process is gone too: nothing holds their locks
        with runlock.RunLock(c):
            pass
    assert f"interrupted; resume with: {paths.python_command(tmp_path)} -m experiments.sweep" in \
           paths.RunPaths.of(cells[0]).output.read_text()
    proc = start()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "resuming seed=0, seed=1 as one program" in out or "resuming seed=" in out, out
    for c in cells:
        assert len(json.loads(paths.RunPaths.of(c).summary_json.read_text())) == 2


# --------------------------------------------------------------------------- plugins

PLUGIN = '''
import flax.linen as nn
import jax.numpy as jnp
from rsst_jax import nets


class CNN3(nn.Module):
    num_classes: int
    widths: tuple = (8, 8, 16)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        for i, width in enumerate(self.widths):
            x = nn.Conv(width, (3, 3), strides=2, padding=1, use_bias=False, dtype=self.dtype,
                        name=f"conv{i + 1}")(x)
            x = nn.BatchNorm(use_running_average=not train, name=f"bn{i + 1}",
                             dtype=self.dtype)(x)
            x = nn.relu(x)
        return nn.Dense(self.num_classes, name="fc")(jnp.mean(x, axis=(1, 2)))


nets.register_net("plugin_cnn3")(lambda num_classes, **kw: CNN3(num_classes, **kw))


@nets.register_rebuild(CNN3)
def narrower(model, shapes, keep):
    return model.clone(widths=tuple(nets.kernel_width(shapes, f"conv{i + 1}") for i in range(3)))
'''


@pytest.mark.slow
def test_a_network_registered_in_your_module_runs_and_reads_everywhere(tmp_path):
    """--import MODULE on run, plot, compare, analyze and compact: a network registered in
    the user's own module trains, and the commands the run prints (with the interpreter
    and the --import that work) read its results; without --import, one line that says
    how to register, exit 2."""
    (tmp_path / "myplugin.py").write_text(PLUGIN)
    flags = ("--dataset digits --arch plugin_cnn3 --epochs 1 --pruning_times 2 --batch_size 128 "
             "--lr 0.1 --warmup 0 --decreasing_lr 100 --eval_batch_size 270 --struct refill "
             "--save_dir run")
    proc = shell(f"experiments.run {flags}", tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "--import MODULE" in one_error_line(err), err
    assert "register_net" in err
    proc = shell(f"experiments.run --import myplugin {flags}", tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    nxt = [line for line in out.splitlines() if line.startswith("next: ")][-1][len("next: "):]
    commands = [c.strip() for c in nxt.split("|")]
    py = paths.python_command(tmp_path)
    assert [c.split()[:5] for c in commands] == [
        [py, "-m", f"experiments.{name}", "--import", "myplugin"]
        for name in ("compare", "plot", "analyze")]
    for command in commands:  # each printed command works as printed
        proc = shell(command.split(" -m ", 1)[1], tmp_path)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (command, err[-2000:])
    assert (tmp_path / "run" / "plots" / "rounds.png").is_file()
    proc = shell("experiments.compact run --out small", tmp_path)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "--import" in one_error_line(err), err
    proc = shell("experiments.compact --import myplugin run --out small --runs 1 "
                 "--batch_sizes 1 --eval_images 16", tmp_path)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]


@pytest.mark.parametrize("name, argv", [
    ("run", ["--dataset", "digits", "--epoch", "1", "--dry_run"]),
    ("sweep", ["--out", "{tmp}/s", "--grid", "seed=0", "--dry", "--base", "--dataset digits"]),
    ("compare", ["{tmp}", "--plo", "x.png"]),
    ("plot", ["{tmp}", "--onl", "rounds"]),
    ("analyze", ["{tmp}", "--appr"]),
    ("compact", ["{tmp}", "--out", "{tmp}/c", "--approx"]),
    ("bench", ["--epoch", "1"]),
])
def test_no_command_takes_an_abbreviated_flag(name, argv, tmp_path, capsys):
    """--epoch is not taken for --epochs (nor any other prefix of a flag)."""
    import importlib
    command = importlib.import_module(f"experiments.{name}")
    try:
        code = command.main([a.format(tmp=tmp_path) for a in argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "unrecognized arguments" in err, err


def _python_blocks(text: str) -> list[str]:
    return [b.split("\n", 1)[1] for b in text.split("```")[1::2] if b.startswith("python\n")]


def test_the_methods_page_shows_the_example_file_whole():
    """docs/methods.md's worked example is examples/taylor.py, to the character."""
    page = (ROOT / "docs" / "methods.md").read_text()
    assert (ROOT / "examples" / "taylor.py").read_text() in _python_blocks(page)


@pytest.mark.slow
def test_the_methods_page_example_runs_resumes_and_reads_everywhere(tmp_path):
    """The page's method, a file outside the package, through experiments.run --import:
    two rounds on digits (with a network of the user's module too), killed with SIGKILL in
    round 1 and resumed to the numbers of an uninterrupted run (its importance, summed in
    the method's own state while the round trains, continues exactly); its own flag and
    log field are where the page says; compare, plot, analyze and compact read the result."""
    (tmp_path / "myplugin.py").write_text(PLUGIN)
    flags = ("--import examples.taylor --import myplugin --struct taylor --dataset digits "
             "--arch plugin_cnn3 --epochs 2 --pruning_times 2 --batch_size 128 --lr 0.1 "
             "--warmup 0 --decreasing_lr 100 --eval_batch_size 270 --rate 0.3 "
             "--taylor_skip 1")
    runs = whole_and_killed(flags, tmp_path)  # killed with its state mid-sum
    assert runs["killed"] == runs["whole"] and len(runs["whole"][0]) == 2
    first, second = runs["whole"][0]
    assert first["channel_sparsity_pct"] == 0 and second["channel_sparsity_pct"] > 0
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["struct"] == "taylor" and config["taylor_skip"] == 1
    log = runs["whole"][1]
    assert len(log) == 4 and all(row["taylor_importance"] > 0 for row in log)
    # The removed channels are whole: every prunable kernel keeps or drops a channel alike.
    from rsst_jax import checkpoint as ckpt
    tree, _ = ckpt.restore_raw(tmp_path / "whole" / "round_1" / "final")
    kept_channels = []
    for layer in ("conv2", "conv3"):
        m = np.asarray(tree["masks"][layer]["kernel"]).reshape(-1, tree["masks"][layer]
                                                                ["kernel"].shape[-1])
        assert np.all(m.all(0) | ~m.any(0)), layer
        kept_channels.append(int(m.any(0).sum()))
    assert sum(kept_channels) < 8 + 16
    out = read_back("--import examples.taylor", "--import myplugin", tmp_path)
    assert "Taylor" in out and "Taylor (BatchNorm)" in out, out
    assert (tmp_path / "whole" / "plots" / "method.png").is_file()  # its declared metric


@pytest.mark.slow
def test_the_baselines_page_command_runs(tmp_path, monkeypatch):
    """docs/baselines.md's sweep and compare, as written but on a tiny configuration
    (the tiny network, 1-epoch rounds, 2 of them) and in this process: all seven methods
    x 3 seeds, each method's seeds one program, one compare row per method."""
    from tiny import use_tiny_data
    use_tiny_data(monkeypatch)
    monkeypatch.chdir(tmp_path)
    page = (ROOT / "docs" / "baselines.md").read_text()
    block = page.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [shlex.split(line) for line in block.strip().splitlines()]
    assert [line[:3] for line in lines] == [[".venv/bin/python", "-m", "experiments.sweep"],
                                            [".venv/bin/python", "-m", "experiments.compare"]]
    argv = lines[0][3:]
    base = argv.index("--base") + 1
    argv[base] += (" --dataset digits --arch tiny_cnn --epochs 1 --pruning_times 2 "
                   "--batch_size 64 --train_subset 256 --eval_batch_size 100 --decreasing_lr 100")
    grids = [argv[i + 1] for i, a in enumerate(argv) if a == "--grid"]
    assert grids == ["struct=none,refill,rsst,slimming,ssl,greg,group", "seed=0,1,2"]
    assert sweep.main(argv + ["--mode", "inprocess", "--import", "tiny", "--no_compare"]) == 0
    out = tmp_path / "runs" / "baselines"
    cells = sorted(p.name for p in out.iterdir() if (p / "summary.json").is_file())
    assert len(cells) == 21
    record = json.loads((out / "sweep.json").read_text())
    assert len({c["program"] for c in record["cells"]}) == 7, record["cells"][:2]
    compare_argv = [a.replace("docs/images/", "") for a in lines[1][3:]]
    assert compare.main(compare_argv) == 0
    table = (out / "table.md").read_text()
    for title in ("IMP", "Refill", "RSST", "Slimming", "SSL", "GReg", "DepGraph"):
        assert f"| {title} |" in table, table
    assert table.count("(3 seeds)") == 7 and "acc@ch50%" in table
    assert (tmp_path / "baselines.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.parametrize("struct, extra", [
    ("slimming", "--slim_lambda 0.01"), ("ssl", "--ssl_lambda 0.05"),
    ("greg", "--greg_delta 0.05 --greg_interval 1"), ("group", "")])
def test_a_baseline_trains_resumes_after_sigkill_and_reads_everywhere(tmp_path, struct, extra):
    """Each baseline through experiments.run: killed with SIGKILL in round 1 and resumed,
    it ends with every number (summary and epoch rows) of a run never stopped; compare,
    plot, analyze and compact read it; its flags are in --help."""
    (tmp_path / "myplugin.py").write_text(PLUGIN)
    flags = (f"--import myplugin --struct {struct} --dataset digits --arch plugin_cnn3 "
             f"--epochs 2 --pruning_times 2 --batch_size 128 --lr 0.1 --warmup 0 "
             f"--decreasing_lr 100 --eval_batch_size 270 --rate 0.3 {extra}")
    runs = whole_and_killed(flags, tmp_path)
    assert runs["killed"] == runs["whole"]
    summary = runs["whole"][0]
    assert len(summary) == 2 and summary[1]["channel_sparsity_pct"] > 0
    title = methods.get_method(struct).title
    out = read_back("", "--import myplugin", tmp_path)
    assert title in out, out
    own = methods.get_method(struct).settings
    if own:
        help_text = cli.run_parser().format_help()
        assert all(f"--{f.name}" in help_text for f in dataclasses.fields(own[1]))
