"""Seed statistics in compare and plot (issue 12, item 5).

Run directories are written by hand (config.json, summary.json, log.jsonl with known
numbers; no training), laid out as ``experiments.run --num_seeds 3`` writes them
(SAVE_DIR/seed_<s>/) and as a sweep with ``--grid seed=0,1,2`` does (cells
``lr=0.1,seed=<s>``). Means and standard deviations are checked against numpy.
"""
from __future__ import annotations

import csv
import json
import math
import pathlib

import numpy as np
import pytest

from experiments import compare, plot
from rsst_jax import config as config_lib
from rsst_jax import runs

# seed x round: what each seed's summary.json holds
ACC = np.array([[98.0, 97.1, 95.3], [97.6, 96.8, 94.1], [98.3, 97.9, 93.2]])
REMAINING = np.array([[100.0, 80.0, 64.0], [100.0, 80.0, 64.2], [100.0, 80.0, 63.9]])
CHANNELS = np.array([[0.0, 19.5, 35.0], [0.0, 19.0, 36.5], [0.0, 20.5, 34.0]])
OLD_CSV = ["run", "method", "criteria", "schedule", "rounds", "remaining_weight_pct",
           "channel_sparsity_pct", "best_acc", "best_round", "acc@80%", "acc@70%", "path"]


def write_run(path: pathlib.Path, seed: int, row: int, rounds: int = 3, **flags) -> pathlib.Path:
    """A finished RSST run of ``rounds`` rounds whose numbers are row ``row`` of the tables."""
    path.mkdir(parents=True)
    values = dict(dataset="digits", struct="rsst", pruning_times=3, rate=0.2, lr=0.1, epochs=2,
                  seed=seed, save_dir=str(path))
    values.update(flags)
    cfg = config_lib.Config.from_dict(values)
    (path / "config.json").write_text(json.dumps(cfg.to_dict()))
    summary, log = [], []
    for r in range(rounds):
        acc = float(ACC[row, r])
        summary.append(dict(round=r, remaining_weight_pct=float(REMAINING[row, r]),
                            channel_sparsity_pct=float(CHANNELS[row, r]), best_val_acc=acc + 1,
                            best_val_epoch=2, test_acc_at_best_val=acc - 0.5, final_val_acc=acc + 1,
                            final_test_acc=acc, rsst_acc_before=acc + 0.4 if r else None,
                            rsst_acc_after=acc if r else None))
        for epoch in (1, 2):
            log.append(dict(round=r, epoch=epoch, train_acc=acc - 3 + epoch, val_acc=acc,
                            test_acc=acc, reg_lambda=1e-4 * epoch if r else None,
                            target_norm_rel=1.0 / epoch if r else None,
                            target_small_frac=0.2 * epoch if r else None))
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in log))
    return path


@pytest.fixture
def num_seeds_dir(tmp_path):
    """SAVE_DIR of ``--num_seeds 3``: seed_0, seed_1, seed_2."""
    save = tmp_path / "rsst"
    for s in range(3):
        write_run(save / f"seed_{s}", s, s, num_seeds=1)
    return save


@pytest.fixture
def sweep_dir(tmp_path):
    """A sweep's --out: lr=0.1 with seeds 0-2 (one printing and fusing differently, as
    such settings change nothing computed), and lr=0.05 with seed 0."""
    out = tmp_path / "sweep"
    write_run(out / "lr=0.1,seed=0", 0, 0)
    write_run(out / "lr=0.1,seed=1", 1, 1, print_freq=7, fused="off", init=str(tmp_path / "w0"))
    write_run(out / "lr=0.1,seed=2", 2, 2)
    write_run(out / "lr=0.05,seed=0", 0, 2, lr=0.05)
    return out


def read_csv(path: pathlib.Path) -> tuple[list[str], dict[str, dict]]:
    with open(path) as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    return reader.fieldnames, {r["run"]: r for r in rows}


def std(values) -> float:
    return float(np.std(np.asarray(values, dtype=np.float64), ddof=1))


# --------------------------------------------------------------------------- grouping


def test_runs_differing_only_in_seed_are_one_group(sweep_dir, num_seeds_dir):
    sweep = [runs.load_run(p) for p in runs.find_runs([sweep_dir])]
    assert [[r.path.name for r in g] for g in runs.group_seeds(sweep)] == [
        ["lr=0.05,seed=0"], ["lr=0.1,seed=0", "lr=0.1,seed=1", "lr=0.1,seed=2"]]
    seeds = [runs.load_run(p) for p in runs.find_runs([num_seeds_dir])]
    assert [[r.name for r in g] for g in runs.group_seeds(seeds[::-1])] == [
        ["seed_0", "seed_1", "seed_2"]]  # sorted by seed
    # The --num_seeds runs and the sweep's lr=0.1 cells compute the same (only save_dir,
    # init, num_seeds, print_freq, fused differ), so together seed 0 comes twice: replicas,
    # not seeds, and each run stays alone.
    notes = []
    mixed = runs.group_seeds(sweep + seeds, note=notes.append)
    assert [len(g) for g in mixed] == [1] * 7 and "not distinct seeds (0, 1, 2, 0, 1, 2)" in notes[0]
    # a run without a configuration groups with nothing
    bare = runs.Run(path=pathlib.Path("x"), config={}, summary=[], log=[])
    assert runs.group_seeds([bare, bare]) == [[bare], [bare]]


def test_seed_names():
    assert runs.strip_seed("struct=rsst,seed=2") == "struct=rsst"
    assert runs.strip_seed("struct=rsst seed=2 criteria=l1") == "struct=rsst criteria=l1"
    assert runs.strip_seed("seed_12") == "" and runs.strip_seed("rsst/seed_1") == "rsst"
    assert runs.strip_seed("seeds=3,lr=0.1") == "seeds=3,lr=0.1"  # not a seed


def test_round_stats_are_numpys_mean_and_sample_std(num_seeds_dir):
    group = [runs.load_run(num_seeds_dir / f"seed_{s}") for s in range(3)]
    for key, table in (("final_test_acc", ACC), ("remaining_weight_pct", REMAINING),
                       ("channel_sparsity_pct", CHANNELS)):
        stats = runs.round_stats(group, key)
        assert list(stats) == [0, 1, 2]
        for r, s in stats.items():
            assert s == runs.SeedStat(float(np.mean(table[:, r])), std(table[:, r]), 3, 3)
    before = runs.round_stats(group, "acc_before_s")  # the rows hold the legacy rsst_acc_*
    assert list(before) == [1, 2] and before[2].mean == float(np.mean(ACC[:, 2] + 0.4))
    assert runs.seed_stat([None, 2.5], of=3) == runs.SeedStat(2.5, None, 1, 3)
    assert runs.seed_stat([None]) is None


# --------------------------------------------------------------------------- compare


def test_compare_table_of_a_seed_group(sweep_dir, tmp_path, capsys):
    out = tmp_path / "table"
    assert compare.main([str(sweep_dir), "--out", str(out), "--levels", "80,70"]) == 0
    text = capsys.readouterr().out
    assert "lr=0.1 (3 seeds)" in text and "±" in text and "sample standard deviation" in text
    header, rows = read_csv(out.with_name("table.csv"))
    assert header == ["run", "seeds", "method", "criteria", "schedule", "rounds"] + [
        f"{c}_{x}" for c in ("remaining_weight_pct", "channel_sparsity_pct", "best_acc")
        for x in ("mean", "std", "n")] + ["best_round"] + [
        f"acc@{lv}%_{x}" for lv in (80, 70) for x in ("mean", "std", "n")] + ["path"]
    group = rows["lr=0.1 (3 seeds)"]
    assert (group["seeds"], group["method"], group["rounds"]) == ("3", "RSST", "3/3")
    for col, values in (("remaining_weight_pct", REMAINING[:, -1]),
                        ("channel_sparsity_pct", CHANNELS[:, -1])):
        assert float(group[f"{col}_mean"]) == float(np.mean(values))
        assert float(group[f"{col}_std"]) == std(values) and group[f"{col}_n"] == "3"
    best = int(np.argmax(ACC.mean(axis=0)))  # the round of the best mean accuracy
    assert int(group["best_round"]) == best == 0
    assert float(group["best_acc_mean"]) == float(np.mean(ACC[:, best]))
    assert float(group["best_acc_std"]) == std(ACC[:, best])
    # acc@X%: matched per seed, then averaged
    assert float(group["acc@80%_mean"]) == float(np.mean(ACC[:, 1]))
    t = [(math.log(80) - math.log(70)) / (math.log(80) - math.log(x)) for x in REMAINING[:, 2]]
    at70 = [ACC[s, 1] + t[s] * (ACC[s, 2] - ACC[s, 1]) for s in range(3)]
    assert float(group["acc@70%_mean"]) == float(np.mean(at70))
    assert float(group["acc@70%_std"]) == std(at70)
    assert len(group["path"].split(";")) == 3
    single = rows["lr=0.05,seed=0"]  # an ordinary run: its value over one seed
    assert single["seeds"] == "1" and single["remaining_weight_pct_std"] == ""
    assert float(single["remaining_weight_pct_mean"]) == REMAINING[2, -1]
    assert single["remaining_weight_pct_n"] == "1"
    md = out.with_name("table.md").read_text()
    assert "| lr=0.1 (3 seeds) |" in md and f"{np.mean(ACC[:, 0]):.2f} ± {std(ACC[:, 0]):.2f}" in md


def test_no_group_seeds_keeps_every_run_and_the_old_columns(sweep_dir, tmp_path, capsys):
    out = tmp_path / "table"
    assert compare.main([str(sweep_dir), "--no-group-seeds", "--out", str(out),
                         "--levels", "80,70"]) == 0
    assert "±" not in capsys.readouterr().out
    header, rows = read_csv(out.with_name("table.csv"))
    assert header == OLD_CSV and len(rows) == 4
    assert float(rows["lr=0.1,seed=1"]["remaining_weight_pct"]) == REMAINING[1, -1]


def test_runs_without_seed_siblings_keep_the_old_table(sweep_dir, tmp_path, capsys):
    one = [str(sweep_dir / "lr=0.1,seed=0"), str(sweep_dir / "lr=0.05,seed=0")]
    assert compare.main(one + ["--out", str(tmp_path / "a"), "--levels", "80,70"]) == 0
    grouped = capsys.readouterr().out
    assert compare.main(one + ["--out", str(tmp_path / "b"), "--levels", "80,70",
                               "--no-group-seeds"]) == 0
    assert capsys.readouterr().out.replace("/b.", "/a.") == grouped
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    assert read_csv(tmp_path / "a.csv")[0] == OLD_CSV


def test_rounds_not_every_seed_finished(tmp_path, capsys):
    save = tmp_path / "rsst"
    write_run(save / "seed_0", 0, 0)
    write_run(save / "seed_1", 1, 1)
    write_run(save / "seed_2", 2, 2, rounds=2)  # still training its last round
    out = tmp_path / "table"
    assert compare.main([str(save), "--out", str(out), "--levels", "80,70"]) == 0
    text = capsys.readouterr().out
    assert "note: rsst (3 seeds): not every seed has finished (round 2 by 2 of 3 seeds)" in text
    assert f"{np.mean(REMAINING[:2, 2]):.2f} ± {std(REMAINING[:2, 2]):.2f} (n=2)" in text
    _, rows = read_csv(out.with_name("table.csv"))
    row = rows["rsst (3 seeds)"]
    assert row["rounds"] == "2-3/3" and row["remaining_weight_pct_n"] == "2"
    assert float(row["remaining_weight_pct_mean"]) == float(np.mean(REMAINING[:2, 2]))
    assert row["acc@70%_n"] == "2" and row["acc@80%_n"] == "3"
    assert "Note: rsst (3 seeds)" in out.with_name("table.md").read_text()


def test_names_per_run_or_per_row(sweep_dir, capsys):
    assert compare.main([str(sweep_dir), "--names", "a,b seed=0,b seed=1,b seed=2"]) == 0
    out = capsys.readouterr().out
    assert "b (3 seeds)" in out and "\na " in out
    assert compare.main([str(sweep_dir), "--names", "low,RSST"]) == 0
    assert "RSST (3 seeds)" in capsys.readouterr().out
    assert compare.main([str(sweep_dir), "--names", "x,y,z"]) == 2
    assert "--names has 3 names for 4 runs (2 rows)" in capsys.readouterr().err


def test_accuracy_chart_draws_a_seed_group_as_one_line_with_a_band(sweep_dir, tmp_path, capsys):
    png, bars = tmp_path / "acc.png", tmp_path / "bars.png"
    assert compare.main([str(sweep_dir), "--names", "low,RSST", "--plot", str(png),
                         "--bar", str(bars)]) == 0
    for path in (png, bars):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    loaded = [runs.load_run(p) for p in runs.find_runs([sweep_dir])]
    entries = runs.group_seeds(loaded)
    labels = compare.plot_accuracy(entries, ["low", "RSST"], "final_test_acc", tmp_path / "x.png")
    assert labels == ["low (RSST, l1)", "RSST (l1, 3 seeds)"]
    points = compare.seed_curve(entries[1], "final_test_acc")  # what the line and band show
    assert [p[1].mean for p in points] == [float(np.mean(ACC[:, r])) for r in range(3)]
    assert [p[1].std for p in points] == [std(ACC[:, r]) for r in range(3)]


# --------------------------------------------------------------------------- plot


def test_plot_of_a_num_seeds_dir(num_seeds_dir, capsys):
    assert plot.main([str(num_seeds_dir), "--only", "rounds,method,epochs"]) == 0
    group = num_seeds_dir / "plots" / "rounds.png"
    assert f"wrote {group}" in capsys.readouterr().out
    for path in [group] + [num_seeds_dir / f"seed_{s}" / "plots" / f"{name}.png"
                           for s in range(3) for name in ("rounds", "method", "epochs")]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    group_runs = [runs.load_run(num_seeds_dir / f"seed_{s}") for s in range(3)]
    labels = plot.plot_seed_rounds(group_runs, "rsst", num_seeds_dir / "x.png")
    assert labels[-1] == "shaded: ± 1 sample standard deviation over the 3 seeds"
    assert "final test accuracy %" in labels


def test_plot_of_a_sweep_and_no_group_seeds(sweep_dir, tmp_path, capsys):
    assert plot.main([str(sweep_dir), "--only", "rounds"]) == 0
    assert (sweep_dir / "plots" / "lr=0.1" / "rounds.png").is_file()
    assert not (sweep_dir / "plots" / "lr=0.05").exists()
    assert plot.main([str(sweep_dir), "--only", "rounds", "--out", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "lr=0.05,seed=0", "lr=0.1", "lr=0.1,seed=0", "lr=0.1,seed=1", "lr=0.1,seed=2"]
    assert plot.main([str(sweep_dir), "--only", "rounds", "--out", str(tmp_path / "p"),
                      "--no-group-seeds"]) == 0
    assert not (tmp_path / "p" / "lr=0.1").exists()
    capsys.readouterr()


def test_accuracy_at_matched_channel_sparsity_interpolates_per_seed(num_seeds_dir):
    """--channel_levels: each seed's accuracy interpolated linearly in channel sparsity
    between the rounds that bracket the level, then mean ± sample std over the seeds; a
    level outside a seed's range counts it out."""
    group = [runs.load_run(num_seeds_dir / f"seed_{k}") for k in range(3)]
    level = 30.0  # between rounds 1 and 2 of every seed
    want = []
    for k in range(3):
        x0, x1, y0, y1 = CHANNELS[k, 1], CHANNELS[k, 2], ACC[k, 1], ACC[k, 2]
        want.append(y0 + (level - x0) / (x1 - x0) * (y1 - y0) if x0 < level < x1 else None)
    got = compare.seed_group_row(group, "g", "final_test_acc", [], [level])
    stat = got[compare.channel_column(level)]
    assert stat == runs.seed_stat(want, of=3)
    assert compare.matched_channel_accuracy([(0.0, 90.0, 0), (40.0, 80.0, 1)], 10.0) == 87.5
    assert compare.matched_channel_accuracy([(0.0, 90.0, 0)], 10.0) is None  # IMP's 0%
    assert compare.default_channel_levels(group) == [
        round(100.0 - round(100.0 * (1.0 - group[0].config["rate"]) ** k, 2), 2)
        for k in range(1, group[0].rounds_planned)]
