"""What a newcomer reads: the plots' axes and panels, where compare says it wrote a chart,
analyze on the weights an RSST ticket keeps at zero, and a Ctrl-C that leaves no lock.

The figures are read as matplotlib objects (axis limits, ticks, line data), not pixels."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from experiments import analyze, compare, plot
from rsst_jax import masks as masks_lib
from rsst_jax import paths as paths_lib
from rsst_jax import runlock, runs, tickets
from tiny import quiet_run, tiny_config, tiny_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def rsst_run(tmp_path_factory):
    """A finished tiny RSST run: 2 rounds of 2 epochs."""
    from rsst_jax import data as data_lib
    save = tmp_path_factory.mktemp("pictures") / "rsst"
    ds = tiny_digits(320)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data_lib, "load_dataset", lambda name, data_dir=None, seed=0: ds)
        quiet_run(tiny_config(save, struct="rsst", criteria="l1", pruning_times=2, epochs=2))
    return save


def test_rounds_png_has_one_scale_and_the_before_s_marker_lets_the_after_show(rsst_run):
    import matplotlib.pyplot as plt
    run = runs.load_run(rsst_run)
    lines, rounds = plot.round_lines(run)
    fig, labels = plot.rounds_figure(lines, rounds, "t")
    left, right = fig.axes[0], fig.axes[1]
    assert left.get_ylim() == right.get_ylim() == plot.Y_LIMITS
    assert list(left.get_yticks()) == list(right.get_yticks()) == [0, 20, 40, 60, 80, 100]
    # 25.9 on the right axis sits where 25.9 is on the left one (and its grid).
    assert right.transData.transform((0, 25.9))[1] == pytest.approx(
        left.transData.transform((0, 25.9))[1], abs=1e-6)
    by_label = {line.get_label(): line for line in right.get_lines()}
    after = by_label["final test accuracy %"]
    before = next(v for k, v in by_label.items() if k.startswith("test accuracy before"))
    assert list(before.get_xdata()) == [1]  # the round that removed channels
    assert before.get_fillstyle() == "none" and before.get_zorder() > after.get_zorder()
    summary = json.loads((rsst_run / "summary.json").read_text())
    assert list(before.get_ydata()) == [summary[1]["acc_before_s"]]
    assert list(after.get_ydata()) == [r["final_test_acc"] for r in summary]
    plt.close(fig)


def test_epochs_png_ticks_are_whole_epochs(rsst_run):
    import matplotlib.pyplot as plt
    fig = plot.epochs_figure(runs.load_run(rsst_run))
    ax = fig.axes[0]
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
    assert [round(x) for x in ax.get_lines()[0].get_xdata()] == [1, 2, 3, 4]
    plt.close(fig)


def test_channels_png_panels_differ_for_rsst(rsst_run):
    import matplotlib.pyplot as plt
    run = runs.load_run(rsst_run)
    layers, rounds, panels = plot.channel_panels(run)
    assert rounds == [0, 1] and len(panels) == 2
    (_, channels), (title, trained) = panels
    assert "kernel mask M" in title
    assert not np.array_equal(channels, trained)
    # the second panel is the mask M of round 1's best-validation checkpoint
    best, _, _ = tickets.read(tickets.resolve(run.path, round_idx=1, kind=paths_lib.BEST))
    assert list(trained[:, 1]) == [r.density for r in masks_lib.report(best["masks"])]
    final, _, _ = tickets.read(tickets.resolve(run.path, round_idx=1))
    assert list(channels[:, 1]) == [r.channels_kept / r.channels_total
                                    for r in masks_lib.report(final["masks"])]
    fig = plot.channels_figure(run)
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(images) == 2 and not np.array_equal(images[0], images[1])
    plt.close(fig)


def test_compare_plot_into_a_folder_says_the_file_it_wrote(rsst_run, tmp_path, capsys):
    folder = tmp_path / "plots"
    folder.mkdir()
    assert compare.main([str(rsst_run), "--plot", str(folder), "--bar", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {folder / 'accuracy.png'}\n" in out and f"wrote {folder / 'bars.png'}\n" in out
    assert sorted(p.name for p in folder.iterdir()) == ["accuracy.png", "bars.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots"]  # no plots.png beside it
    assert compare.main([str(rsst_run), "--plot", str(tmp_path / "chart")]) == 0
    assert f"wrote {tmp_path / 'chart.png'}\n" in capsys.readouterr().out
    assert (tmp_path / "chart.png").is_file()


def test_analyze_says_why_an_rsst_ticket_keeps_zero_weights(rsst_run, capsys):
    ticket = tickets.load(rsst_run, round_idx=1)
    rows = masks_lib.report(ticket.masks, ticket.params)
    kept, nonzero = sum(r.kept for r in rows), sum(r.nonzero for r in rows)
    assert kept > nonzero
    assert analyze.main([str(rsst_run)]) == 0
    out = capsys.readouterr().out
    assert f"note: {kept - nonzero:,} of the {kept:,} kept weights are exactly zero" in out
    assert "trained with the kernel mask M" in out
    assert analyze.main([str(rsst_run), "--round", "0"]) == 0  # dense: nothing to explain
    assert "exactly zero" not in capsys.readouterr().out


def test_a_process_ended_by_ctrl_c_leaves_no_lock_file(tmp_path):
    """ExitOnInterrupt ends the process with os._exit; the lock it held is released first."""
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {ROOT!r})
        from experiments import cli
        from rsst_jax import runlock
        lock = runlock.RunLock({str(tmp_path)!r}).acquire()
        with cli.ExitOnInterrupt("python -m x --resume"):
            print("locked", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    assert (tmp_path / runlock.LOCK_NAME).exists()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and err == "interrupted; resume with: python -m x --resume\n"
    assert not (tmp_path / runlock.LOCK_NAME).exists()
    notes = []
    runlock.RunLock(tmp_path, log=notes.append).acquire().release()
    assert notes == []


@pytest.mark.slow
def test_the_resume_after_ctrl_c_prints_no_stale_lock_note(tmp_path):
    from rsst_jax import checkpoint as ckpt
    from test_commands import _interrupt
    from test_reliability import TINY_FLAGS, run_child, start_child
    save = tmp_path / "run"
    argv = TINY_FLAGS + ["--struct", "none", "--pruning_times", "2", "--epochs", "1",
                         "--save_dir", str(save)]
    proc = start_child(argv)
    checkpoints = paths_lib.RunPaths.of(save).checkpoints
    _, err = _interrupt(proc, lambda: ckpt.latest_step(checkpoints) is not None, "checkpoint")
    assert proc.returncode == 130, err
    assert not (save / runlock.LOCK_NAME).exists()
    done = run_child(argv + ["--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stale lock" not in done.stdout + done.stderr
    assert len(json.loads((save / "summary.json").read_text())) == 2


def test_the_next_commands_of_a_built_in_network_import_nothing():
    """res20s is registered as a functools.partial; the printed commands need no --import."""
    from rsst_jax import config as config_lib
    from rsst_jax import nets
    assert nets.registered_module("res20s") == "rsst_jax.nets.resnet_cifar"
    for name in ("res56s", "res18", "vgg16_bn", "mobilenet"):
        assert nets.registered_module(name).startswith("rsst_jax.nets."), name
    assert config_lib.plugin_modules(config_lib.Config()) == []  # res20s, l1
