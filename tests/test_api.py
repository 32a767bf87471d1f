"""docs/api.md runs as written and gives what the command line gives; importing the
library changes nothing global."""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from rsst_jax import checkpoint as ckpt

from tiny import use_tiny_data

ROOT = pathlib.Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", API.read_text(), flags=re.S)


def test_the_loop_on_the_page_is_at_most_40_lines():
    loop = _blocks()[0]
    assert "for struct in (\"none\", \"refill\", \"rsst\")" in loop
    assert len([line for line in loop.splitlines() if line.strip()]) <= 40


@pytest.mark.slow
def test_api_page_gives_the_masks_and_accuracies_of_the_command_line(tmp_path, monkeypatch):
    """The page's loop (on the tiny digits, as every test here) against experiments.run
    with the page's flags: every round's masks equal and the same test accuracy."""
    from experiments import run as run_cli
    use_tiny_data(monkeypatch)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for code in _blocks():
        exec(compile(code, str(API), "exec"), namespace)
    results = namespace["results"]
    for struct in ("none", "refill", "rsst"):
        save = tmp_path / f"cli_{struct}"
        assert run_cli.main(["--dataset", "digits", "--struct", struct, "--pruning_times", "2",
                             "--epochs", "1", "--lr", "0.1", "--warmup", "0", "--decreasing_lr",
                             "1", "--batch_size", "64", "--criteria", "l1", "--seed", "0",
                             "--fused", "off", "--save_dir", str(save)]) == 0
        rows = json.loads((save / "summary.json").read_text())
        for r in (0, 1):
            tree, _ = ckpt.restore_raw(save / f"round_{r}" / "final")
            masks, acc = results[struct, r]
            got = jax.tree_util.tree_leaves(masks)
            want = jax.tree_util.tree_leaves(tree["masks"])
            assert len(got) == len(want) > 0
            for a, b in zip(got, want):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert acc == rows[r]["final_test_acc"], (struct, r)
    assert results["rsst", 1][0] is not None  # RSST's round 1 ended with S applied


def test_import_changes_no_logger_and_no_jax_setting():
    code = """
import logging, jax
def snap():
    loggers = {n: (l.level, len(l.handlers), l.propagate)
               for n, l in logging.Logger.manager.loggerDict.items() if isinstance(l, logging.Logger)}
    root = logging.getLogger()
    return loggers, (root.level, list(root.handlers)), {k: getattr(jax.config, k) for k in (
        "jax_enable_x64", "jax_compilation_cache_dir", "jax_default_matmul_precision")}
a = snap()
import rsst_jax, rsst_jax.driver, rsst_jax.engine
b = snap()
changed = [n for n in a[0] if a[0][n] != b[0].get(n)]
new = [n for n in set(b[0]) - set(a[0]) if b[0][n][:2] != (0, 0)]
print(changed, new, a[1] == b[1], a[2] == b[2])
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == "[] [] True True", out.stdout
