"""compare, plot, analyze and sweep on real (tiny) digits runs (issue 5, items 1-4).

The runs come from docs/comparison.md, run as written once per session (``workflow``):
a sweep of IMP and RSST on a narrow ResNet-8, then compare, plot and analyze. The
tests check what those commands produced against the runs' own summaries and
checkpoints, then feed the commands bad input. Commands are called in this process
(``main(argv)``) where they need no network registered; the doc's network is
registered here only for the duration of a test (``res8_registered``).
"""
from __future__ import annotations

import csv
import json
import math
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import analyze, compare, plot, sweep
from rsst_jax import masks as masks_lib
from rsst_jax import nets, paths, runs, tickets
from test_recipes import ROOT, assert_ran, run_doc

QUICK = "runs/quick"
CELLS = ("struct=none", "struct=rsst")
BASE = "--dataset digits --arch res8s_narrow --epochs 1 --pruning_times 2 --warmup 0 --lr 0.1 --batch_size 128"


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("comparison")
    proc = run_doc("comparison.md", workdir)
    assert_ran(proc)
    return workdir, proc


@pytest.fixture
def quick(workflow):
    return workflow[0] / QUICK


@pytest.fixture
def res8_registered(monkeypatch):
    """The doc's res8s_narrow in the registry of this process, for one test."""
    from rsst_jax.nets.resnet_cifar import ResNetCifar

    def res8s_narrow(num_classes, *, shortcut="A", dtype=np.float32):
        return ResNetCifar(num_blocks=(1, 1, 1), widths=(8, 16, 32), num_classes=num_classes,
                           shortcut=shortcut, dtype=dtype)

    monkeypatch.setitem(nets._REGISTRY, "res8s_narrow", res8s_narrow)


def _summary(quick, cell):
    return json.loads((quick / cell / "summary.json").read_text())


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- compare


def test_compare_table_equals_the_summaries(quick):
    with open(quick / "table.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == list(CELLS)
    for cell, method, criteria in (("struct=none", "IMP", "-"), ("struct=rsst", "RSST", "l1")):
        summary, row = _summary(quick, cell), rows[cell]
        accs = [r["final_test_acc"] for r in summary]
        best = int(np.argmax(accs))
        assert (row["method"], row["criteria"], row["rounds"]) == (method, criteria, "2/2")
        assert float(row["remaining_weight_pct"]) == summary[-1]["remaining_weight_pct"]
        assert float(row["channel_sparsity_pct"]) == summary[-1]["channel_sparsity_pct"]
        assert float(row["best_acc"]) == accs[best] and int(row["best_round"]) == best
        x0, x1 = summary[0]["remaining_weight_pct"], summary[1]["remaining_weight_pct"]
        for level in (90, 80):
            got = row[f"acc@{level}%"]
            if abs(x1 - level) <= 1e-4 * level:
                assert float(got) == accs[1]
            elif x1 < level:
                t = (math.log(x0) - math.log(level)) / (math.log(x0) - math.log(x1))
                assert float(got) == pytest.approx(accs[0] + t * (accs[1] - accs[0]), abs=1e-9)
            else:
                assert got == ""
    assert rows["struct=rsst"]["schedule"] == "exp_custom_exponents=4"
    md = (quick / "table.md").read_text()
    assert md.count("| struct=") == 2 and "| ---: |" in md


def test_sweep_compared_its_cells(workflow):
    workdir, proc = workflow
    quick = workdir / QUICK
    record = json.loads((quick / "sweep.json").read_text())
    assert [(c["name"], c["status"], c["returncode"]) for c in record["cells"]] == \
           [("struct=none", "finished", 0), ("struct=rsst", "finished", 0)]
    with open(quick / "comparison.csv") as f:
        assert [r["run"] for r in csv.DictReader(f)] == list(CELLS)
    assert "struct=rsst  RSST" in proc.stdout  # the table printed on the terminal


def test_matched_accuracy_interpolates_in_log_space():
    pts = [(100.0, 90.0, 0), (80.0, 88.0, 1), (64.0, 80.0, 2)]
    assert compare.matched_accuracy(pts, 80.0) == 88.0
    assert compare.matched_accuracy(pts, 80.004) == 88.0           # within 0.01%
    t = math.log(80 / 70) / math.log(80 / 64)
    assert compare.matched_accuracy(pts, 70.0) == pytest.approx(88.0 - 8.0 * t)
    assert compare.matched_accuracy(pts, 50.0) is None and compare.matched_accuracy(pts, 120.0) is None


def test_default_levels_and_ticks():
    run = runs.Run(path=pathlib.Path("x"), config={"rate": 0.2, "pruning_times": 21}, summary=[], log=[])
    levels = compare.default_levels([run])
    assert len(levels) == 5 and levels[0] == 80.0 and levels[-1] == round(100 * 0.8 ** 20, 2)
    ticks = compare.spread_ticks([100, 80, 78.9, 64, 51.2, 1.15])
    assert ticks[0] == 100 and ticks[-1] == 1.15 and 78.9 not in ticks


# --------------------------------------------------------------------------- pictures


def _check_png(path: pathlib.Path, min_colors: int = 20):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert h >= 300 and w >= 500, (path, img.shape)
    rgb = (img[::3, ::3, :3] * 255).astype(np.uint8).reshape(-1, 3)  # every 9th pixel is plenty
    colors = np.unique(rgb[:, 0].astype(np.int32) << 16 | rgb[:, 1].astype(np.int32) << 8 | rgb[:, 2])
    assert len(colors) >= min_colors and rgb.std() > 5, path


def test_comparison_pictures_are_real(quick):
    for name in ("comparison.png", "accuracy.png", "bars.png"):
        _check_png(quick / name)


def test_plot_wrote_each_runs_pictures(quick):
    for cell in CELLS:
        for name in ("rounds", "channels", "epochs"):
            _check_png(quick / cell / "plots" / f"{name}.png")
    _check_png(quick / "struct=rsst" / "plots" / "method.png")
    assert not (quick / "struct=none" / "plots" / "method.png").exists()  # IMP logs none


def _leaf(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return np.asarray(tree)


def test_channel_map_is_the_masks_channel_fraction(quick):
    run = runs.load_run(quick / "struct=rsst")
    layers, rounds, ch, wt = plot.layer_table(run)
    assert rounds == [0, 1]
    arrays, _, _ = tickets.read(tickets.resolve(run.path, round_idx=1))
    assert layers == [r.path for r in masks_lib.report(arrays["masks"])]
    for i, layer in enumerate(layers):
        m = _leaf(arrays["masks"], layer)
        assert ch[i, 0] == 1.0 and wt[i, 0] == 1.0
        assert ch[i, 1] == m.reshape(-1, m.shape[-1]).any(axis=0).mean() and wt[i, 1] == m.mean()


def test_method_panels_read_the_declared_metrics_as_logged(quick):
    """method.png's panels are the plotted epoch metrics RSST declares, each read from the
    rounds that logged it (round 1: round 0 penalizes nothing); IMP declares none."""
    run = runs.load_run(quick / "struct=rsst")
    panels, by_round = plot.method_panels(run)
    assert [m.key for m in panels] == ["reg_lambda", "target_norm_rel", "target_small_frac"]
    assert list(by_round) == [1]
    assert by_round[1][-1]["reg_lambda"] == run.summary[1]["final_lambda"]
    assert plot.method_panels(runs.load_run(quick / "struct=none")) == ([], {})


# --------------------------------------------------------------------------- analyze


def test_analyze_json_of_a_best_checkpoint(quick, res8_registered, capsys):
    assert analyze.main([str(quick / "struct=rsst" / "round_0" / "best"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    tree, meta, _ = tickets.read(quick / "struct=rsst" / "round_0" / "best")
    assert (result["kind"], result["round"], result["arch"], result["arch_from"]) == \
           ("best", 0, "res8s_narrow", "checkpoint")  # best checkpoints name their network
    report = masks_lib.report(tree["masks"], tree["params"])
    assert [(layer["path"], layer["kept"], layer["total"], layer["channels_kept"], layer["nonzero"])
            for layer in result["layers"]] == \
           [(r.path, r.kept, r.total, r.channels_kept, r.nonzero) for r in report]
    total = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(tree["params"]))
    assert result["params"]["total"] == total and result["params"]["prunable"] == sum(r.total for r in report)
    row = _summary(quick, "struct=rsst")[0]
    acc = result["accuracy"]
    assert acc["checkpoint_val_acc"] == meta["val_acc"] == row["best_val_acc"]
    assert acc["final_test_acc"] == row["final_test_acc"]
    assert result["compact"]["compact_params"] == result["compact"]["params"] == total  # round 0: dense


def test_analyze_final_ticket_counts(quick, res8_registered, capsys):
    assert analyze.main([str(quick / "struct=rsst"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    row = _summary(quick, "struct=rsst")[1]
    assert result["round"] == 1 and result["arch_from"] == "checkpoint"
    assert result["params"]["remaining_weight_pct"] == pytest.approx(row["remaining_weight_pct"], abs=1e-9)
    assert result["params"]["channel_sparsity_pct"] == pytest.approx(row["channel_sparsity_pct"], abs=1e-9)
    c = result["compact"]
    assert c["compact_params"] < c["params"] and c["compact_flops"] < c["flops"]
    assert result["accuracy"]["acc_after_s"] == row["acc_after_s"]
    # The same, told the network by flags after the checkpoint was copied out of its run.
    alone = quick.parent / "alone"
    shutil.copytree(quick / "struct=rsst" / "round_1" / "best", alone, dirs_exist_ok=True)
    assert analyze.main([str(alone), "--arch", "res8s_narrow", "--dataset", "digits"]) == 0
    text = capsys.readouterr().out
    assert "network: res8s_narrow (from --arch)" in text and "FLOPs per image" in text


# --------------------------------------------------------------------------- sweep


def test_sweep_skips_finished_cells_and_refuses_changed_ones(quick, res8_registered, capsys):
    argv = ["--out", str(quick), "--mode", "inprocess", "--base", BASE, "--grid", "struct=none,rsst"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert "[sweep] running" not in out and out.count("  done") == 2 and "2 of 2 cells finished" in out
    changed = [a.replace("--lr 0.1", "--lr 0.2") for a in argv]
    assert sweep.main(changed) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "different flags: --lr 0.1 (now 0.2)" in line


def test_sweep_resumes_an_unfinished_cell(quick, tmp_path, res8_registered, capsys):
    for cell in CELLS:
        shutil.copytree(quick / cell, tmp_path / cell)
    summary = _summary(quick, "struct=rsst")[:1]
    (tmp_path / "struct=rsst" / "summary.json").write_text(json.dumps(summary))
    argv = ["--out", str(tmp_path), "--base", BASE, "--grid", "struct=none,rsst", "--dry_run"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert "struct=none  done" in out and "struct=rsst  partial" in out
    commands = [line for line in out.splitlines()
                if line.startswith(f"{paths.python_command()} -m experiments.run")]
    assert len(commands) == 1 and "--resume" in commands[0].split() and "struct=rsst" in commands[0]


# --------------------------------------------------------------------------- bad input


def test_help_of_every_command(capsys):
    for module, flags in ((compare, ("--plot", "--levels", "--metric")), (plot, ("--only", "--out")),
                          (analyze, ("--json", "--best", "--arch")),
                          (sweep, ("--grid", "--variant", "--mode", "--parallel"))):
        with pytest.raises(SystemExit) as e:
            module.main(["--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert all(f in text for f in flags), module.__name__


def test_not_a_run_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    for main in (compare.main, plot.main, analyze.main):
        assert main([str(tmp_path)]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert str(tmp_path) in line
    assert compare.main([str(tmp_path / "missing")]) == 2
    assert "no such" in _one_error_line(capsys.readouterr().err)


def test_older_layouts_are_refused_clearly(quick, tmp_path, capsys):
    # A checkpoint whose metadata names another layout version.
    old = tmp_path / "old_meta"
    shutil.copytree(quick / "struct=rsst" / "round_1" / "final", old)
    step = next(old.iterdir())
    meta_file = step / "meta" / "metadata"
    meta_file.write_text(json.dumps(dict(json.loads(meta_file.read_text()), layout_version=0)))
    assert analyze.main([str(old)]) == 2
    assert "layout version 0" in _one_error_line(capsys.readouterr().err)
    # A step folder with arrays but no metadata (written before meta/ existed).
    bare = tmp_path / "bare" / "3"
    (bare / "state").mkdir(parents=True)
    assert analyze.main([str(bare.parent)]) == 2
    assert "older or foreign layout" in _one_error_line(capsys.readouterr().err)
    # A run whose summary rows lack this layout's columns.
    run = tmp_path / "old_run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps([{"round": 0, "acc": 91.0}]))
    for main in (compare.main, plot.main):
        assert main([str(run)]) == 2
        assert "older layout" in _one_error_line(capsys.readouterr().err)


def test_empty_and_malformed_sweeps(tmp_path, capsys):
    for argv, words in (([], "empty sweep"), (["--grid", "struct="], "empty value"),
                        (["--grid", "stuct=none"], "did you mean struct"),
                        (["--grid", "struct=none", "--base", "--save_dir x"], "must not set --save_dir"),
                        (["--grid", "struct=none", "--grid", "struct=rsst"], "given twice")):
        assert sweep.main(["--out", str(tmp_path / "s")] + argv) == 2
        assert words in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "s").exists()


def test_bad_input_from_the_shell_has_no_traceback(tmp_path, capsys):
    """The same through ``python -m``, and argparse's own errors as one line too."""
    proc = subprocess.run([sys.executable, "-m", "experiments.analyze", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and str(tmp_path) in _one_error_line(proc.stderr)
    for main, argv in ((compare.main, ["--levels"]), (sweep.main, ["--grid", "struct=none"]),
                       (plot.main, []), (analyze.main, ["x", "--round", "one"])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert "--help" in _one_error_line(capsys.readouterr().err)


def test_sweep_plans_cells_from_grids_and_variants(tmp_path):
    """Cells are the base configuration with the variant's flags, then the grid's values,
    put in (no command-line tokens edited); each cell's command resolves to its config."""
    from experiments import cli

    cells = sweep.plan(tmp_path, ["--dataset", "digits", "--struct", "rsst", "--conv1", "--warmup", "0"],
                       ["criteria=l1,l2", "conv1=false,true", "layer_rates=layer1=0.5,layer3=2|layer2=0"],
                       ["a=--epochs 3", "b=--reg_adaptive --target_acc 50"])
    assert len(cells) == 2 * 2 * 2 * 2
    first = cells[0]
    assert first.name == "variant=a,criteria=l1,conv1=false,layer_rates=layer1_0.5+layer3_2"
    assert first.path == tmp_path / first.name and first.cfg.run.save_dir == str(first.path)
    c = first.cfg
    assert (c.data.dataset, c.prune.struct, c.optim.epochs, c.prune.criteria, c.prune.layer_rates,
            c.optim.warmup) == ("digits", "rsst", 3, "l1", "layer1=0.5,layer3=2", 0)
    assert c.prune.conv1 is False  # the base's --conv1 is overridden by the grid
    assert cells[3].cfg.prune.conv1 is True and cells[3].cfg.prune.layer_rates == "layer2=0"
    assert cells[-1].cfg.rsst.reg_adaptive and cells[-1].cfg.rsst.target_acc == 50.0
    assert cells[-1].cfg.optim.epochs == 120  # variant a's flags stay in variant a
    assert len({c.path for c in cells}) == len(cells)
    for cell in cells:
        assert cli.parse_run_args(cell.argv) == cell.cfg
