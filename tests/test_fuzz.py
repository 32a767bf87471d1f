"""Fuzzing: random command lines and config files at ``--dry_run``, random inputs at the
pure functions of ``rsst_jax.masks``. Nothing may escape as a traceback: the command
line answers 0 or 2 (one ``error:`` line), the mask functions succeed or raise
ValueError with a message.
"""
from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from experiments import run as run_cli
from rsst_jax import config as config_lib
from rsst_jax import data as data_lib
from rsst_jax import masks as masks_lib

import tiny

FIXTURES_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture,
                                              HealthCheck.too_slow], deadline=None)

# ------------------------------------------------------------------ the command line

NUMBERS = ["0", "1", "2", "-1", "0.5", "0.2", "1.5", "nan", "inf", "-inf", "1e309", "abc", "",
           "2147483648", "99999999999999999999", "3", "0x10"] + ["1", "2", "0.5", "0.1"] * 3
FIELDS = {name: config_lib.field_of(name) for name in config_lib.flag_names()}
CHOICES = config_lib.choices()
SPECIAL = {
    "dataset": ["digits", "digits", "digits", "fashion_mnist", "cifar10", "tiny-imagenet", "nope", ""],
    "arch": ["tiny_cnn", "tiny_cnn", "tiny_cnn", "res20s", "nope", ""],
    "decreasing_lr": ["5,8", "0", "a,b", "", " ", "3", "1,,2", "-4"],
    "rate_schedule": ["1,0.5", "x", "", "2", "1,-1", "nan"],
    "layer_rates": ["conv=0.5", "(=1", "x", "conv2=6", "", "conv=nan", "=", "conv=0.5,fc=2"],
    "data": ["/nonexistent", "."],
    "pretrained": ["/nonexistent", "DIR", "FILE"],
    "checkpoint": ["/nonexistent", "DIR", "FILE"],
    "init": ["/nonexistent/x", "DIR", "FILE"],
    "save_dir": ["RUN", "FILE/run", "RUN2"],
}
SKIP = {"config", "dry_run"}  # always set by the test


@st.composite
def flag_lists(draw):
    names = draw(st.lists(st.sampled_from(sorted(set(FIELDS) - SKIP)), max_size=4, unique=True))
    argv = []
    for name in names:
        field = FIELDS[name]
        if field.type in ("bool", "Optional[bool]"):
            if field.default is None or field.default is True:
                argv.append(draw(st.sampled_from([f"--{name}", f"--no-{name}"])))
            else:
                argv.append(f"--{name}")
            continue
        if name in SPECIAL:
            value = draw(st.sampled_from(SPECIAL[name]))
        elif name in CHOICES:
            value = draw(st.sampled_from(list(CHOICES[name]) + ["bogus"]))
        else:
            value = draw(st.sampled_from(NUMBERS))
        argv += [f"--{name}", value]
    return argv


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 200), st.sampled_from([2 ** 40, -2 ** 63]),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                    st.sampled_from(["digits", "tiny_cnn", "rsst", "5,8", "conv=0.5", "global"]))
VALUES = st.one_of(SCALARS, st.lists(st.integers(0, 9), max_size=3),
                   st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
KEYS = st.one_of(st.sampled_from(sorted(FIELDS)), st.text(max_size=6))


@st.composite
def config_files(draw):
    """(suffix, text) of a config file: a random mapping in some format, or junk."""
    kind = draw(st.sampled_from(["json", "yaml", "toml", "junk"]))
    values = draw(st.dictionaries(KEYS, VALUES, max_size=5))
    if kind == "json":
        return ".json", json.dumps(values)
    if kind == "yaml":
        return ".yaml", yaml.safe_dump(values)
    if kind == "toml":
        lines = []
        for k, v in values.items():  # a TOML subset writer; odd values make odd TOML
            rendered = json.dumps(v) if not isinstance(v, bool) else str(v).lower()
            lines.append(f'"{k}" = {rendered}')
        return ".toml", "\n".join(lines)
    return draw(st.sampled_from([".yaml", ".toml", ".json", ".cfg"])), draw(st.text(max_size=40))


_counter = itertools.count()
REAL_LOAD = data_lib.load_dataset


@FIXTURES_OK
@given(flags=flag_lists(), cfg=st.one_of(st.none(), st.none(), config_files()))
def test_dry_run_answers_every_command_line_with_0_or_one_error_line(flags, cfg, tmp_path,
                                                                     monkeypatch, capsys):
    small = tiny.tiny_digits()

    def load(name, data_dir=None, seed=0):
        if name == "digits":
            return small
        return REAL_LOAD(name, "/nonexistent", seed=seed)  # the missing-data path, quickly
    monkeypatch.setattr(data_lib, "load_dataset", load)

    (tmp_path / "DIR").mkdir(exist_ok=True)
    (tmp_path / "FILE").write_text("x")
    subst = {"DIR": str(tmp_path / "DIR"), "FILE": str(tmp_path / "FILE"),
             "RUN": str(tmp_path / "run"), "RUN2": str(tmp_path / "run2"),
             "FILE/run": str(tmp_path / "FILE" / "run")}
    # A base that works (digits, the tiny net, a warm-up that fits), then random flags.
    argv = ["--dry_run", "--dataset", "digits", "--arch", "tiny_cnn", "--epochs", "3",
            "--warmup", "1", "--save_dir", str(tmp_path / "run")] + [subst.get(a, a) for a in flags]
    if cfg is not None:
        path = tmp_path / f"c{next(_counter)}{cfg[0]}"
        path.write_text(cfg[1])
        argv += ["--config", str(path)]
    code = run_cli.main(argv)
    out = capsys.readouterr()
    event(f"exit {code}" + (": " + out.err.split(":")[1].strip()[:30] if code else ""))
    assert code in (0, 2), (argv, code, out.err)
    if code == 2:
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > 8, \
            (argv, out.err)
    else:
        assert "parameters" in out.out and "round 0: expected remaining weights 100.00%" \
            in out.out, (argv, out.out)


# ------------------------------------------------------------------ rsst_jax.masks

SHAPES = [(3, 3, 2, 4), (1, 1, 4, 4), (3, 3, 1, 2), (4, 3), (2,)]
LAYERS = ["conv1", "conv2", "block/conv", "fc", "bn"]


@st.composite
def param_trees(draw):
    names = draw(st.lists(st.sampled_from(LAYERS), min_size=1, max_size=3, unique=True))
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    special = draw(st.sampled_from([None, np.nan, np.inf, -np.inf, 0.0]))
    params = {}
    for name in names:
        shape = draw(st.sampled_from(SHAPES))
        w = rng.normal(size=shape).astype(np.float32)
        if special is not None and w.size:
            w.reshape(-1)[rng.integers(0, w.size, max(1, w.size // 4))] = special
        leaf = "kernel" if name != "bn" else "scale"
        node = params
        for part in name.split("/"):
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(w)
        if draw(st.booleans()):
            node["bias"] = jnp.zeros((shape[-1],), jnp.float32)
    return params, rng


def _random_contents(masks, rng, keep_prob):
    return jax.tree_util.tree_map(
        lambda m: None if m is None else jnp.asarray(rng.random(m.shape) < keep_prob),
        masks, is_leaf=lambda x: x is None)


def _first_leaf_path(tree):
    """Keys to the first dict leaf (a mask or None) of a nested dict."""
    node, keys = tree, []
    while isinstance(node, dict) and node:
        k = sorted(node)[0]
        keys.append(k)
        node = node[k]
    return keys


def _set(tree, keys, value):
    tree = jax.tree_util.tree_map(lambda x: x, tree, is_leaf=lambda x: x is None)  # copy dicts
    node = tree
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return tree


@st.composite
def mask_trees(draw, params, rng):
    conv1 = draw(st.booleans())
    fc = draw(st.booleans())
    masks = masks_lib.init_masks(params, conv1=conv1, fc=fc)
    masks = _random_contents(masks, rng, draw(st.sampled_from([1.0, 0.7, 0.3, 0.0])))
    how = draw(st.sampled_from(["ok"] * 10 + ["missing", "extra", "shape", "dtype", "none",
                                              "list", "scalar", "string"]))
    keys = _first_leaf_path(masks)
    if how == "missing" and len(keys) > 0:
        node = masks
        for k in keys[:-1]:
            node = node[k]
        node.pop(keys[-1])
    elif how == "extra":
        masks = dict(masks, extra={"kernel": jnp.ones((2, 2), bool)})
    elif how == "shape":
        masks = _set(masks, keys, jnp.ones((5, 5), bool))
    elif how == "dtype":
        masks = _set(masks, keys, jnp.ones(np.shape(_get(params, keys)), jnp.float32))
    elif how == "none":
        masks = _set(masks, keys, None)
    elif how == "list":
        masks = [masks]
    elif how == "scalar":
        masks = _set(masks, keys, True)
    elif how == "string":
        masks = _set(masks, keys, "kept")
    return masks


def _get(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


GOOD_RATES = st.one_of(st.floats(0.0, 0.999), st.sampled_from([0.0, 0.2, 0.5, 0.99, 1.0]))
RATES = st.one_of(
    GOOD_RATES, GOOD_RATES, GOOD_RATES,
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 2),
    st.sampled_from([float("nan"), -0.1, 1.5, "0.5", None, [0.1], np.float32(0.3),
                     jnp.asarray(0.3), np.asarray([0.1, 0.2])]))
SCOPES = st.sampled_from(["global", "layerwise"] * 4 + ["bogus", None, 3])
LAYER_RATES = st.one_of(
    st.none(), st.none(), st.none(),
    # (no 5, [5] or {3: 1.0}: see test_layer_rates_of_the_wrong_type_raise_value_error)
    st.sampled_from([{}, "conv=0.5", [("conv", 0.5)], [("conv",)]]),
    st.dictionaries(st.sampled_from(["conv", "(", "fc$", "", "block/.*", "[a-"]),
                    st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                              st.sampled_from(["2", "x", None, -1.0, [1]])), max_size=2))


def _leaves(tree):
    return jax.tree_util.tree_leaves(tree, is_leaf=lambda x: x is None)


def _check_subset(new, old):
    assert jax.tree_util.tree_structure(new, is_leaf=lambda x: x is None) == \
        jax.tree_util.tree_structure(old, is_leaf=lambda x: x is None)
    for a, b in zip(_leaves(new), _leaves(old)):
        assert (a is None) == (b is None)
        if a is not None:
            a, b = np.asarray(a), np.asarray(b)
            assert a.dtype == np.bool_ and a.shape == b.shape
            assert not np.any(a & ~b)  # pruning never revives an entry


def _call(fn, *args, **kwargs):
    """fn's result, or None after a ValueError with a message; anything else fails."""
    try:
        out = fn(*args, **kwargs), True
    except ValueError as e:
        assert str(e).strip(), f"{fn.__name__} raised a ValueError without a message"
        event(f"{fn.__name__}: ValueError")
        return None, False
    event(f"{fn.__name__}: ok")
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mask_functions_succeed_or_raise_value_error(data):
    params, rng = data.draw(param_trees())
    masks = data.draw(mask_trees(params, rng))
    rate = data.draw(RATES)
    scope = data.draw(SCOPES)
    layer_rates = data.draw(LAYER_RATES)
    which = data.draw(st.sampled_from(["magnitude", "random", "filter", "refill", "targets",
                                       "apply", "reports", "prunable"]))
    if which == "magnitude":
        out, ok = _call(masks_lib.magnitude_prune, params, masks, rate, scope=scope,
                        layer_rates=layer_rates)
        if ok:
            _check_subset(out, masks)
    elif which == "random":
        key = data.draw(st.sampled_from([jax.random.PRNGKey(1), jax.random.key(2)]))
        out, ok = _call(masks_lib.random_prune, key, masks, rate, scope=scope,
                        layer_rates=layer_rates)
        if ok:
            _check_subset(out, masks)
    elif which == "filter":
        out, ok = _call(masks_lib.filter_prune, params, masks, rate, layer_rates=layer_rates)
        if ok:
            _check_subset(out, masks)
    elif which == "refill":
        how = data.draw(st.sampled_from(["ok", "nan", "shape", "none", "tree"]))
        try:
            scores = masks_lib.map_prunable(
                lambda m: jnp.asarray(rng.normal(size=m.shape[-1:]), jnp.float32), masks)
        except Exception:  # masks too broken to even build scores from
            scores = {"x": jnp.zeros((3,))}
        if how == "nan":
            scores = jax.tree_util.tree_map(lambda s: s.at[0].set(jnp.nan), scores)
        elif how == "shape":
            scores = jax.tree_util.tree_map(lambda s: jnp.zeros((s.shape[0] + 1,)), scores)
        elif how == "none":
            scores = jax.tree_util.tree_map(lambda s: None, scores)
        elif how == "tree":
            scores = [scores]
        out, ok = _call(masks_lib.refill, masks, scores, rate)
        if ok:
            for m, _ in zip(_leaves(out), _leaves(masks)):
                if m is not None:
                    per = np.asarray(m).reshape(-1, m.shape[-1])
                    assert np.all(per.all(0) | ~per.any(0))  # whole channels
                    assert per.all(0).sum() >= 1
    elif which == "targets":
        other = data.draw(mask_trees(params, rng))
        out, ok = _call(masks_lib.rsst_targets, masks, other)
        if ok:
            for t, m, s in zip(_leaves(out), _leaves(masks), _leaves(other)):
                if t is not None:
                    assert np.array_equal(np.asarray(t), np.asarray(m) & ~np.asarray(s))
    elif which == "apply":
        out, ok = _call(masks_lib.apply_masks, params, masks)
        if ok:
            for w, m in zip(_leaves(masks_lib.map_prunable(lambda m, w: w, masks, out)),
                            _leaves(masks)):
                if m is not None:
                    assert np.all(np.asarray(w)[~np.asarray(m)] == 0)
    elif which == "reports":
        out, ok = _call(masks_lib.report, masks, params)
        if ok:
            assert sum(r.total for r in out) == sum(
                np.size(m) for m in _leaves(masks) if m is not None)
            d = masks_lib.density(masks)
            assert 0.0 <= d <= 1.0
            assert 0.0 <= masks_lib.channel_sparsity(masks) <= 1.0
            masks_lib.format_report(out)
    else:
        conv1, fc = data.draw(st.booleans()), data.draw(st.booleans())
        stem = data.draw(st.sampled_from([None, "conv1", "conv2/kernel", "nope"]))
        out, ok = _call(masks_lib.init_masks, params, conv1=conv1, fc=fc, stem=stem)
        if ok:
            _, valid = _call(masks_lib.check_masks, params, out)
            assert valid  # init_masks makes a mask that check_masks accepts


@pytest.mark.parametrize("layer_rates", [5, [5], {3: 1.0}])
def test_layer_rates_of_the_wrong_type_raise_value_error(layer_rates):
    params = {"conv1": {"kernel": jnp.ones((3, 3, 1, 2))}, "conv2": {"kernel": jnp.ones((3, 3, 2, 4))}}
    masks = masks_lib.init_masks(params)
    with pytest.raises(ValueError, match="layer_rates"):
        masks_lib.magnitude_prune(params, masks, 0.2, scope="layerwise", layer_rates=layer_rates)
