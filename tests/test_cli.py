"""The command line: one-line errors with exit code 2 before any compute, bad data files
named in the message, and ``--dry_run``'s report.

Subprocess tests run ``python -m experiments.run`` for real (started together, since
each spends its time importing JAX); the many validation cases call ``main(argv)``.
"""
from __future__ import annotations

import gzip
import json
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest

from experiments import run as run_cli
from rsst_jax import checkpoint as ckpt

import tiny

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_clis(cases: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Run ``python -m experiments.run ARGS`` for every case at once; name -> result."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TQDM_DISABLE="1")
    env.pop("RSST_JAX_STOP_AFTER", None)
    procs = {name: subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=ROOT,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
             for name, args in cases.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


def assert_one_line_error(res, *needles):
    err = res.stderr.strip()
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ------------------------------------------------------------------ issue 2: CLI errors

def test_cli_errors_are_one_line_with_the_fix_and_exit_2(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    save = ["--save_dir", str(tmp_path / "run")]
    results = run_clis({
        "arch": ["--dataset", "digits", "--arch", "resnet9000", *save],
        "dataset": ["--dataset", "imagenet22k", *save],
        "data": ["--dataset", "fashion_mnist", "--data", "/nonexistent", *save],
        "rate": ["--dataset", "digits", "--rate", "1.5", *save],
        "save_dir": ["--dataset", "digits", "--save_dir", str(blocker / "run")],
        "choice": ["--dataset", "digits", "--optimizer", "lbfgs", *save],
        "int": ["--dataset", "digits", "--epochs", "ten", *save],
    })
    assert_one_line_error(results["arch"], "unknown --arch 'resnet9000'", "choose one of",
                          "res20s")
    assert_one_line_error(results["dataset"], "unknown --dataset 'imagenet22k'",
                          "choose one of", "digits")
    assert_one_line_error(results["data"], "Fashion-MNIST not found in /nonexistent", "put ",
                          "train-images-idx3-ubyte.gz", "or use --dataset digits")
    assert_one_line_error(results["rate"], "--rate must be in [0, 1), got 1.5")
    assert_one_line_error(results["save_dir"], f"--save_dir {blocker / 'run'} is not writable",
                          "choose another directory with --save_dir")
    assert_one_line_error(results["choice"], "argument --optimizer: invalid choice: 'lbfgs'",
                          "'sgd'", "--help")
    assert_one_line_error(results["int"], "argument --epochs: invalid int value: 'ten'")
    assert not (tmp_path / "run").exists()  # nothing ran, no empty directory left behind


# ------------------------------------------------------------------ issue 4: bad data

def _idx(path: pathlib.Path, array: np.ndarray, truncate: int = 0):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    raw = gzip.compress(header + array.astype(np.uint8).tobytes())
    path.write_bytes(raw[:len(raw) - truncate] if truncate else raw)


def _fashion(root: pathlib.Path, *, truncate_train_images=0, bad_label=False, side=28):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 24)
    if bad_label:
        labels[5] = 12
    _idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (24, side, side)),
         truncate=truncate_train_images)
    _idx(root / "train-labels-idx1-ubyte.gz", labels)
    _idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (12, side, side)))
    _idx(root / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 12))
    return root


def _cifar10(root: pathlib.Path, *, garbage=None, width=3072, bad_label=False):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(v) for v in rng.integers(0, 10, 4)]
        if bad_label and name == "data_batch_3":
            labels[1] = 10
        batch = {b"data": rng.integers(0, 255, (4, width)).astype(np.uint8), b"labels": labels}
        (folder / name).write_bytes(pickle.dumps(batch))
    if garbage:
        (folder / garbage).write_bytes(b"\x80\x04this is not a pickle")
    return folder


def _tiny_imagenet(root: pathlib.Path, val_side: int):
    from PIL import Image
    base = root / "tiny-imagenet-200"
    (base / "train" / "n01" / "images").mkdir(parents=True)
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("n01\n")
    Image.new("RGB", (64, 64)).save(base / "train" / "n01" / "images" / "a.JPEG")
    Image.new("RGB", (val_side, val_side)).save(base / "val" / "images" / "v.JPEG")
    (base / "val" / "val_annotations.txt").write_text("v.JPEG\tn01\t0\t0\t1\t1\n")
    return base


def test_bad_data_files_are_named_with_exit_2(tmp_path):
    fm = lambda name, **kw: _fashion(tmp_path / name, **kw)  # noqa: E731
    trunc = fm("trunc", truncate_train_images=200)
    labels = fm("labels", bad_label=True)
    shape = fm("shape", side=27)
    c10_garbage = _cifar10(tmp_path / "c10g", garbage="data_batch_2")
    c10_width = _cifar10(tmp_path / "c10w", width=3000)
    c10_labels = _cifar10(tmp_path / "c10l", bad_label=True)
    tin = _tiny_imagenet(tmp_path / "tin", val_side=32)
    save = ["--save_dir", str(tmp_path / "run"), "--epochs", "1", "--warmup", "0"]
    results = run_clis({
        "trunc": ["--dataset", "fashion_mnist", "--data", str(trunc), *save],
        "labels": ["--dataset", "fashion_mnist", "--data", str(labels), *save],
        "shape": ["--dataset", "fashion_mnist", "--data", str(shape), *save],
        "c10_garbage": ["--dataset", "cifar10", "--data", str(tmp_path / "c10g"), *save],
        "c10_width": ["--dataset", "cifar10", "--data", str(tmp_path / "c10w"), *save],
        "c10_labels": ["--dataset", "cifar10", "--data", str(tmp_path / "c10l"), *save,
                       "--dry_run"],
        "tin": ["--dataset", "tiny-imagenet", "--data", str(tmp_path / "tin"), *save],
    })
    assert_one_line_error(results["trunc"], str(trunc / "train-images-idx3-ubyte.gz"),
                          "truncated or corrupt", "download it again")
    assert_one_line_error(results["labels"], str(labels / "train-labels-idx1-ubyte.gz"),
                          "labels must lie in [0, 10), found 0..12")
    assert_one_line_error(results["shape"], str(shape / "train-images-idx3-ubyte.gz"),
                          "expected 28x28 images, got (27, 27)")
    assert_one_line_error(results["c10_garbage"], str(c10_garbage / "data_batch_2"),
                          "is not a CIFAR python batch")
    assert_one_line_error(results["c10_width"], str(c10_width / "data_batch_1"),
                          "expected b'data' of uint8 [N, 3072]")
    assert_one_line_error(results["c10_labels"], str(c10_labels / "data_batch_3"),
                          "labels must lie in [0, 10)")
    assert_one_line_error(results["tin"], str(tin / "val" / "images" / "v.JPEG"),
                          "expected a (64, 64, 3) image, got (32, 32, 3)")


# ------------------------------------------------------------------ validation (in-process)

def _main(argv, capsys):
    code = run_cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no proc file system here")
@pytest.mark.parametrize("dry", [True, False])
def test_a_save_dir_that_cannot_be_created_is_refused_naming_it(dry, capsys):
    # /proc refuses new directories even to root, whom the permission bits let write.
    code, out, err = _main(["--dataset", "digits", "--save_dir", "/proc/rsst_test_run/x"]
                           + (["--dry_run"] if dry else []), capsys)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("error: --save_dir /proc/rsst_test_run/x "), err
    assert "/proc/rsst_test_run cannot be created" in err and "new run" not in out


def test_the_writability_probe_leaves_nothing_behind(tmp_path):
    from experiments import cli
    assert cli._unwritable(tmp_path / "a" / "b") is None
    assert cli._unwritable(tmp_path) is None
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def cfg_file(tmp_path):
    def write(text: str, suffix: str = ".yaml") -> str:
        path = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*')))}{suffix}"
        path.write_text(text)
        return str(path)
    return write


def test_every_bad_flag_or_combination_is_refused_before_compute(tmp_path, capsys, cfg_file,
                                                                 monkeypatch):
    def no_data(*a, **k):
        raise AssertionError("validation must fail before the data are loaded")
    monkeypatch.setattr(run_cli.cli, "check_save_dir", lambda p: None)
    from rsst_jax import data as data_lib
    monkeypatch.setattr(data_lib, "load_dataset", no_data)
    existing = tmp_path / "exists"
    existing.mkdir()
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    cases = [
        (["--prune_type", "rewind_lt", "--rewind_epoch", "5", "--epochs", "5", "--warmup", "0"],
         "--rewind_epoch 5 must be below --epochs 5"),
        (["--struct", "refill", "--prune_method", "filter"], "already channel-wise"),
        (["--struct", "rsst", "--prune_method", "filter"], "use --struct none"),
        (["--config", cfg_file("epochs: 3\nlearning_rate: 0.1\n")], "unknown keys learning_rate"),
        (["--config", cfg_file("epochs: ten\n")], "--epochs must be an integer, got 'ten'"),
        (["--config", cfg_file("struct: bogus\n")], "unknown --struct 'bogus'; choose one of: none, refill, rsst, slimming, ssl, greg, group; or register"),
        (["--config", cfg_file("lr: [1, 2]\n")], "--lr must be a number"),
        (["--config", cfg_file("resume: 1\n")], "--resume must be true or false"),
        (["--config", cfg_file("epochs = [", ".toml")], "cannot parse it"),
        (["--config", cfg_file("- 1\n- 2\n")], "expected a mapping"),
        (["--config", str(tmp_path / "missing.yaml")], "no such file"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--lr", "0"], "--lr must be a positive number"),
        (["--momentum", "1"], "--momentum must be in [0, 1)"),
        (["--weight_decay", "inf"], "--weight_decay must be a finite number"),
        (["--rate", "-0.1"], "--rate must be in [0, 1)"),
        (["--fillback_rate", "1.5"], "--fillback_rate must be in [0, 1]"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--epochs", "5"], "--warmup 20 is longer than --epochs 5"),
        (["--batch_size", "0"], "--batch_size must be >= 1"),
        (["--pruning_times", "0"], "--pruning_times must be >= 1"),
        (["--pruning_times", "5000"], "--pruning_times must be <= 1000"),
        (["--seed", "-1"], "--seed must be in [0, 2**32)"),
        (["--decreasing_lr", "0,10"], "--decreasing_lr epochs must be positive"),
        (["--decreasing_lr", "ten"], "--decreasing_lr must be comma-separated integers"),
        (["--rate_schedule", "1,x"], "--rate_schedule must be comma-separated numbers"),
        (["--rate_schedule", "1,5"], "--rate_schedule multipliers times --rate"),
        (["--layer_rates", "layer1"], "--layer_rates wants REGEX=MULT"),
        (["--layer_rates", "layer1=6"], "--layer_rates layer1=6.0: --rate 0.2 times it"),
        (["--layer_rates", "layer1=0.5", "--prune_method", "random"],
         "--layer_rates applies to --prune_method magnitude"),
        (["--prune_type", "pt"], "--prune_type pt needs --pretrained"),
        (["--prune_type", "pt", "--pretrained", str(tmp_path / "nope")], "no such file"),
        (["--pretrained", str(existing)], "--pretrained is only used with --prune_type pt"),
        (["--checkpoint", str(existing)], "add --resume"),
        (["--resume", "--checkpoint", str(tmp_path / "nope")], "no such directory"),
        (["--init", str(a_file)], "is a file"),
        (["--struct", "none", "--fillback_rate", "0.5"], "needs --struct refill, rsst"),
        (["--struct", "refill", "--block_loss_grad"], "--block_loss_grad acts only with --struct rsst"),
        (["--reg_adaptive"], "--reg_adaptive needs --target_acc"),
        (["--reg_adaptive", "--target_acc", "120"], "--target_acc is a percentage"),
        (["--exponents", "0"], "--exponents must be > 0"),
        (["--reg_granularity_prune", "-1"], "--reg_granularity_prune must be >= 0"),
        (["--reg_upper_limit", "0"], "--reg_upper_limit must be > 0"),
        (["--update_reg_interval", "0"], "--update_reg_interval must be >= 1"),
        (["--kd_alpha", "2"], "--kd_alpha must be in [0, 1]"),
        (["--criteria_batches", "0"], "--criteria_batches must be >= 1"),
        (["--shortcut", "B", "--arch", "vgg11_bn"], "--shortcut applies to the CIFAR ResNets"),
        (["--save_dir", " "], "--save_dir must name a directory"),
        (["--eval_batch_size", "3000000000"], "--eval_batch_size 3000000000 is out of range"),
    ]
    for flags, needle in cases:
        code, out, err = _main(["--dataset", "digits", "--save_dir", str(tmp_path / "r"),
                                "--dry_run", *flags], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (flags, err)
        assert needle in lines[0], (flags, lines[0])
        assert out == ""


def test_config_file_values_are_typed_and_flags_override_them(tmp_path, capsys, cfg_file,
                                                              monkeypatch):
    tiny.use_tiny_data(monkeypatch)
    path = cfg_file("epochs: 4\nwarmup: 1.0\nlr: 1\ndecreasing_lr: [2, 3]\nstruct: refill\n"
                    "rate: 0.5\nseed: 7\n")
    code, out, err = _main(["--config", path, "--dataset", "digits", "--arch", "tiny_cnn",
                            "--rate", "0.3", "--save_dir", str(tmp_path / "r"), "--dry_run"],
                           capsys)
    assert code == 0, err
    resolved = json.loads(out[:out.index("\n}\n") + 2])
    assert resolved["epochs"] == 4 and resolved["warmup"] == 1 and isinstance(resolved["warmup"], int)
    assert resolved["lr"] == 1.0 and isinstance(resolved["lr"], float)
    assert resolved["decreasing_lr"] == "2,3" and resolved["struct"] == "refill"
    assert resolved["rate"] == 0.3 and resolved["seed"] == 7  # the command line wins


# ------------------------------------------------------------------ --dry_run

def test_dry_run_prints_config_data_parameters_and_planned_densities(tmp_path, capsys,
                                                                     monkeypatch):
    tiny.use_tiny_data(monkeypatch)
    save = tmp_path / "dry"
    argv = ["--dataset", "digits", "--arch", "tiny_cnn", "--pruning_times", "4", "--rate", "0.2",
            "--epochs", "2", "--warmup", "0", "--struct", "none", "--save_dir", str(save),
            "--dry_run"]
    code, out, err = _main(argv, capsys)
    assert code == 0, err
    resolved = json.loads(out[:out.index("\n}\n") + 2])
    assert resolved["arch"] == "tiny_cnn" and resolved["seed"] == 0 and resolved["dry_run"]
    report = out[out.index("\n}\n") + 3:].splitlines()
    assert report[0].startswith("data set digits found (its default location): train 320, "
                                "val 100, test 100 images of shape (8, 8, 1), 10 classes")
    # TinyCNN on 8x8x1: conv 72 + 864 + 1728, BN 2 * (8 + 12 + 16), fc 16 * 10 + 10;
    # prunable by default: every conv kernel but the stem.
    assert report[1] == "network tiny_cnn: 2,906 parameters, 2,592 prunable"
    # Global magnitude pruning removes round(0.2 * kept) each round.
    assert report[3:7] == [
        "  round 0: expected remaining weights 100.00% (2,592 prunable weights)",
        "  round 1: expected remaining weights 80.00% (2,074 prunable weights)",
        "  round 2: expected remaining weights 64.00% (1,659 prunable weights)",
        "  round 3: expected remaining weights 51.20% (1,327 prunable weights)"]
    assert report[-1] == f"save_dir {save}: new run"
    assert not save.exists()  # nothing computed, nothing written, not even the directory

    # On a directory that holds a run: refused without --resume, described with it.
    from experiments import cli
    from tiny import quiet_run
    cfg = cli.parse_run_args([a for a in argv if a != "--dry_run"])
    monkeypatch.setenv("RSST_JAX_STOP_AFTER", "1")  # stop after the first epoch's checkpoint
    with pytest.raises(SystemExit):
        quiet_run(cfg)
    code, _, err = _main(argv, capsys)
    assert code == 2 and "already holds a run; pass --resume" in err
    code, out, _ = _main(argv + ["--resume"], capsys)
    assert ckpt.latest_step(save / "checkpoints") == 1
    assert code == 0 and out.splitlines()[-1] == (
        f"save_dir {save}: resumes from {save / 'checkpoints' / '1'} at round 0, epoch 1")
    # Resuming with another semantic flag is refused (dry run and real run alike);
    # --fused/--fused_steps give equal results and may change.
    for run_it in ([], ["--dry_run"]):
        flags = [a for a in argv if a != "--dry_run"] + ["--resume", "--lr", "0.5"] + run_it
        code, _, err = _main(flags, capsys)
        assert code == 2 and "was made with a different configuration: --lr 0.01 (now 0.5)" in err
    code, out, err = _main(argv + ["--resume", "--fused", "on", "--fused_steps", "3"], capsys)
    assert code == 0, err
