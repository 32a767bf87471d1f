"""A damaged newest checkpoint: detected, set aside (renamed, never deleted), the one before used."""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rsst_jax import checkpoint as ckpt


def _tree(step: int) -> dict:
    """Values that differ per step; ``big`` (4 KiB) lies in its own OCDBT data file, the
    small leaves inline in the b-tree node."""
    rng = np.random.default_rng(step)
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3) * step,
            "b": {"n": np.array([step, -step], np.int32)},
            "big": rng.normal(size=(32, 32)).astype(np.float32)}


def _template() -> dict:
    return {"w": np.zeros((2, 3), np.float32), "b": {"n": np.zeros(2, np.int32)},
            "big": np.zeros((32, 32), np.float32)}


def _three_steps(d: pathlib.Path) -> pathlib.Path:
    for s in (1, 2, 3):
        ckpt.save(d, s, _tree(s), {"k": s}, keep=2)
    assert ckpt.steps(d) == [2, 3]
    return d


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    """The OCDBT files under state/ (b-tree nodes, array chunks, manifests)."""
    state = step_dir / "state"
    return [p for p in state.rglob("*") if p.is_file()
            and (p.parent.name == "d" or p.name == "manifest.ocdbt")]


def _largest(step_dir: pathlib.Path) -> pathlib.Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def _truncate_data_file(step):
    f = _largest(step)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_a_data_byte(step):
    # zstd without a content checksum decodes a flipped literal to other numbers, silently.
    f = _largest(step)
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))


def _random_data_files(step):
    for f in _data_files(step):
        f.write_bytes(os.urandom(f.stat().st_size))


def _random_every_state_file(step):
    for f in (step / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(os.urandom(max(1, f.stat().st_size)))


def _delete_meta(step):
    (step / "meta" / "metadata").unlink()


def _garble_meta(step):
    (step / "meta" / "metadata").write_text('{"k": 3, "layout_vers')


def _delete_checkpoint_metadata(step):
    (step / "_CHECKPOINT_METADATA").unlink()


def _delete_state(step):
    import shutil
    shutil.rmtree(step / "state")


CORRUPTIONS = {
    "truncated data file": (_truncate_data_file, "cannot read its arrays"),
    "flipped data byte": (_flip_a_data_byte, "the data of big does not match its checksum"),
    "random bytes in the data files": (_random_data_files, "cannot read its array metadata"),
    "random bytes in every state file": (_random_every_state_file, "cannot read its array metadata"),
    "no meta/metadata": (_delete_meta, "no meta/metadata"),
    "garbled meta/metadata": (_garble_meta, "meta/metadata: JSONDecodeError"),
    "no _CHECKPOINT_METADATA": (_delete_checkpoint_metadata, "no _CHECKPOINT_METADATA"),
    "no state/": (_delete_state, "no state/ directory"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_damaged_newest_step_is_set_aside_and_the_previous_one_restored(tmp_path, name):
    corrupt, reason = CORRUPTIONS[name]
    d = _three_steps(tmp_path / "checkpoints")
    corrupt(d / "3")
    damaged = _files(d / "3")
    lines = []
    tree, meta, step = ckpt.restore_newest_good(d, _template(), log=lines.append)

    assert step == 2 and meta == {"k": 2, "layout_version": ckpt.LAYOUT_VERSION}
    for key, value in (("w", _tree(2)["w"]), ("big", _tree(2)["big"])):
        np.testing.assert_array_equal(tree[key], value)
        assert tree[key].dtype == value.dtype
    np.testing.assert_array_equal(tree["b"]["n"], [2, -2])
    assert len(lines) == 1
    logged = re.fullmatch(rf"checkpoint {re.escape(str(d / '3'))} is unusable \((.+)\); set aside "
                          rf"as {re.escape(str(d / '3.bad'))}, trying the previous one", lines[0])
    assert logged and reason in logged[1] and len(logged[1]) <= 200 and str(d) not in logged[1]
    # Set aside: renamed as is, out of the step namespace, never deleted by later saves.
    assert not (d / "3").exists() and _files(d / "3.bad") == damaged
    assert ckpt.steps(d) == [2]
    for s in (4, 5, 6):
        ckpt.save(d, s, _tree(s), {"k": s}, keep=2)
    assert ckpt.steps(d) == [5, 6] and _files(d / "3.bad") == damaged
    assert ckpt.restore_newest_good(d, _template(), log=lines.append)[2] == 6 and len(lines) == 1


@pytest.mark.parametrize("name", ["truncated data file", "flipped data byte", "no meta/metadata",
                                  "random bytes in every state file"])
def test_restore_and_restore_raw_raise_one_line_on_damage(tmp_path, name):
    corrupt, reason = CORRUPTIONS[name]
    d = _three_steps(tmp_path / "checkpoints")
    corrupt(d / "3")
    for call in (lambda: ckpt.restore(d, _template()), lambda: ckpt.restore_raw(d)):
        with pytest.raises(ckpt.CheckpointError) as e:
            call()
        assert str(e.value).startswith(f"cannot restore {d / '3'}: ") and reason in str(e.value)
        assert "\n" not in str(e.value)
    assert (d / "3").is_dir()  # only restore_newest_good sets a step aside
    np.testing.assert_array_equal(ckpt.restore(d, _template(), 2)[0]["big"], _tree(2)["big"])
    np.testing.assert_array_equal(ckpt.restore_raw(d, 2)[0]["big"], _tree(2)["big"])


def test_no_usable_step_is_one_error_line_naming_every_step_tried(tmp_path):
    d = _three_steps(tmp_path / "checkpoints")
    _truncate_data_file(d / "3")
    _delete_meta(d / "2")
    lines = []
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.restore_newest_good(d, _template(), log=lines.append)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"no usable checkpoint in {d}: tried 3 (")
    assert "; 2 (no meta/metadata)" in message and "without --resume" in message
    assert lines[0].endswith(f"set aside as {d / '3.bad'}, trying the previous one")
    assert lines[1] == (f"checkpoint {d / '2'} is unusable (no meta/metadata); "
                        f"set aside as {d / '2.bad'}")
    assert ckpt.steps(d) == [] and {p.name for p in d.iterdir()} == {"2.bad", "3.bad"}
    with pytest.raises(ckpt.CheckpointError, match="^no checkpoint in "):
        ckpt.restore_newest_good(d, _template(), log=lines.append)
    assert len(lines) == 2


def test_a_step_unlike_the_template_or_refused_by_check_is_set_aside(tmp_path):
    d = tmp_path / "checkpoints"
    ckpt.save(d, 1, _tree(1), {"k": 1}, keep=3)
    ckpt.save(d, 2, _tree(2), {"k": 2}, keep=3)
    wrong_dtype = dict(_tree(3), w=_tree(3)["w"].astype(np.float64))
    ckpt.save(d, 3, wrong_dtype, {"k": 3}, keep=3)
    lines = []
    refuse_2 = lambda tree, meta: "non-finite values" if meta["k"] == 2 else None  # noqa: E731
    tree, meta, step = ckpt.restore_newest_good(d, _template(), check=refuse_2, log=lines.append)
    assert step == 1 and meta["k"] == 1
    np.testing.assert_array_equal(tree["big"], _tree(1)["big"])
    assert "(w is (2, 3) float64 in the checkpoint, (2, 3) float32 expected)" in lines[0]
    assert lines[1] == (f"checkpoint {d / '2'} is unusable (non-finite values); set aside as "
                        f"{d / '2.bad'}, trying the previous one")
    assert ckpt.steps(d) == [1]


def test_set_aside_never_overwrites_an_earlier_set_aside_copy(tmp_path):
    d = tmp_path / "checkpoints"
    for _ in range(3):
        ckpt.save(d, 7, _tree(7), {"k": 7})
        _delete_meta(d / "7")
        with pytest.raises(ckpt.CheckpointError):
            ckpt.restore_newest_good(d, _template(), log=lambda line: None)
    assert sorted(p.name for p in d.iterdir()) == ["7.bad", "bad-7-1", "bad-7-2"]


def test_checksums_are_in_the_saved_meta_not_in_the_returned_one(tmp_path):
    d = _three_steps(tmp_path / "checkpoints")
    stored = json.loads((d / "3" / "meta" / "metadata").read_text())
    assert set(stored["checksums"]) == {"w", "b/n", "big"}
    assert ckpt.read_meta(d) == ckpt.restore(d, _template())[1] == ckpt.restore_raw(d)[1] == \
        {"k": 3, "layout_version": ckpt.LAYOUT_VERSION}


# A failed restore leaves tensorstore reads in flight on the event loop orbax closes at
# once (orbax 0.12.8 still does); their callbacks printed "RuntimeError: Event loop is
# closed" tracebacks, often at exit (122 tracebacks in this child without the fix). The
# loops orbax makes here come from asyncio's policy, and first let those reads finish
# (checkpoint._PatientLoop; the child says how many it closed: none would mean orbax no
# longer makes its loops that way). The child corrupts checkpoints several ways (reads
# fail at the array metadata and at the array data) and restores each, several times.
CHILD = textwrap.dedent(r"""
    import os, sys, pathlib
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    import test_checkpoint_fallback as t
    from rsst_jax import checkpoint as ckpt

    root = pathlib.Path(sys.argv[1])
    def truncate_all(step):
        for f in t._data_files(step):
            f.write_bytes(f.read_bytes()[:9])

    for i, corrupt in enumerate([t._random_data_files, t._truncate_data_file, truncate_all]):
        d = root / str(i)
        for s in (1, 2):
            tree = {f"a{k}": np.full((40, 40), s + k, np.float32) for k in range(12)}
            ckpt.save(d, s, tree, keep=2)
        template = {f"a{k}": np.zeros((40, 40), np.float32) for k in range(12)}
        for s in (1, 2):
            corrupt(d / str(s))
        for _ in range(3):
            for s in (1, 2):
                try:
                    ckpt.restore(d, template, s)
                except ckpt.CheckpointError as e:
                    print(e, flush=True)
        try:
            ckpt.restore_newest_good(d, template, log=print)
        except ckpt.CheckpointError as e:
            print(e, flush=True)
    print("patient loops", ckpt._PatientLoop.closed, flush=True)
    print("done", flush=True)
""")


def test_failed_restores_print_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path),
                           str(pathlib.Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.rstrip().endswith("done")
    assert proc.stdout.count("no usable checkpoint in ") == 3
    assert int(proc.stdout.split("patient loops ")[1].split()[0]) > 0
    for noise in ("Traceback", "Event loop is closed", "never retrieved"):
        assert noise not in proc.stderr, proc.stderr[-3000:]
