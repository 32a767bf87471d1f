"""Methods as registered objects, and each flag declared once with its facts."""
from __future__ import annotations

import dataclasses
import importlib
import json
import sys

import numpy as np
import pytest

from experiments import cli
from rsst_jax import config as config_lib
from rsst_jax import methods

from tiny import quiet_run, tiny_config, use_tiny_data

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture
def plugin_registry():
    """Whatever a test registers (methods, flag groups) leaves with it, so other tests see
    the built-in configuration."""
    from rsst_jax.methods import registry
    methods_before, groups_before = dict(registry._REGISTRY), dict(config_lib._GROUPS)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    modules_before = set(sys.modules)
    try:
        yield
    finally:
        for name in set(sys.modules) - modules_before:
            if name.startswith(("examples.", "flagtypes_", "careless_")):
                sys.modules.pop(name, None)
        registry._REGISTRY.clear()
        registry._REGISTRY.update(methods_before)
        config_lib._GROUPS.clear()
        config_lib._GROUPS.update(groups_before)


@pytest.fixture
def taylor(plugin_registry):
    """examples/taylor.py, the methods page's worked example."""
    return importlib.import_module("examples.taylor")


# --------------------------------------------------------------------------- flags

def test_every_flag_carries_its_facts_and_the_command_line_reads_them():
    """Each flag is declared once: the parser's help text and choices, the groupable,
    non-semantic, finite and seed-like sets all come from its Flag."""
    parser = cli.run_parser()
    actions = {a.dest: a for a in parser._actions}
    for name in config_lib.flag_names():
        facts = config_lib.facts(name)
        assert facts.help.strip(), name
        assert actions[name].help == facts.help.replace("%", "%%"), name
        allowed = facts.allowed()
        if allowed is not None and facts.registry is None:
            assert tuple(actions[name].choices) == allowed, name
    assert set(config_lib.names_where(seed_like=True)) == {"seed", "num_seeds", "save_dir", "init"}
    assert "lr" in config_lib.names_where(groupable=True)
    assert "batch_size" not in config_lib.names_where(groupable=True)
    assert "fused" in config_lib.names_where(semantic=False)
    assert "lr" not in config_lib.names_where(semantic=False)


def test_groupable_and_semantic_facts_decide_grouping_and_resume():
    base = config_lib.Config.from_dict(dict(dataset="digits"))
    config_lib.check_groupable([base, base.replace(lr=0.5, seed=3, criteria="l2")])
    with pytest.raises(config_lib.ConfigError, match="must agree on batch_size"):
        config_lib.check_groupable([base, base.replace(batch_size=32)])
    saved = base.to_dict()
    assert config_lib.semantic_diffs(saved, base.replace(fused="off").to_dict()) == ""
    assert "--epochs" in config_lib.semantic_diffs(saved, base.replace(epochs=3).to_dict())


def test_a_group_of_flags_joins_the_configuration_and_refuses_taken_names(taylor):
    @dataclasses.dataclass(frozen=True)
    class Clash:
        lr: float = config_lib.flag(0.1, "a second --lr")

    with pytest.raises(ValueError, match="--lr already exists"):
        config_lib.register_group("clash_test", Clash)

    @dataclasses.dataclass(frozen=True)
    class Bare:
        thing: int = 3

    with pytest.raises(ValueError, match="declare it with rsst_jax.config.flag"):
        config_lib.register_group("bare_test", Bare)
    cfg = config_lib.Config.from_dict(dict(struct="taylor", taylor_skip=4))
    assert cfg.taylor.taylor_skip == 4 and cfg.get("taylor_skip") == 4
    assert config_lib.Config.from_dict(cfg.to_dict()) == cfg
    assert "taylor_skip" not in config_lib.names_where(groupable=True)
    assert cli.parse_run_args(["--struct", "taylor", "--taylor_skip", "2"]).taylor.taylor_skip == 2
    assert cli.parse_run_args(["--struct", "taylor"]).taylor.taylor_skip is None  # int | None
    assert "--taylor_skip" in cli.flags_markdown()
    assert config_lib.plugin_modules(cfg) == ["examples.taylor"]


FLAG_TYPES = '''{future}
import dataclasses
from typing import Literal, Optional

from rsst_jax import config, methods


@dataclasses.dataclass(frozen=True)
class Flags{n}:
    {p}_on: bool = config.flag(False, "a switch")
    {p}_count: int = config.flag(3, "an integer")
    {p}_scale: float = config.flag(0.5, "a number")
    {p}_name: str = config.flag("x", "a string")
    {p}_steps: Optional[int] = config.flag(None, "an optional integer")
    {p}_cap: float | None = config.flag(None, "an optional number, new spelling")
    {p}_mode: Literal["fast", "slow"] = config.flag("fast", "one of two")


config.register_group("{p}", Flags{n})


@methods.register_method
class Typed{n}(methods.Method):
    name = "{p}"
    settings = ("{p}", Flags{n})

    def next_masks(self, ticket, scoring):
        return ticket.masks, None
'''


@pytest.mark.parametrize("future", [True, False])
def test_a_plugin_flag_of_each_type_parses_validates_and_reads_back(tmp_path, monkeypatch,
                                                                   plugin_registry, future):
    """bool, int, float, str, Optional[int], float | None and Literal[...], with and
    without ``from __future__ import annotations``: the command line, --config values,
    their defaults (None where optional) and the Literal's choices all work."""
    p = f"ft{int(future)}"
    module = f"flagtypes_{p}"
    (tmp_path / f"{module}.py").write_text(FLAG_TYPES.format(
        future="from __future__ import annotations" if future else "", n=int(future), p=p))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module(module)
    kinds = {f"{p}_{k}": config_lib.flag_type(f"{p}_{k}") for k in (
        "on", "count", "scale", "name", "steps", "cap", "mode")}
    assert {k: (t.base, t.optional) for k, t in kinds.items()} == {
        f"{p}_on": (bool, False), f"{p}_count": (int, False), f"{p}_scale": (float, False),
        f"{p}_name": (str, False), f"{p}_steps": (int, True), f"{p}_cap": (float, True),
        f"{p}_mode": (str, False)}
    assert kinds[f"{p}_mode"].literal == ("fast", "slow")
    cfg = cli.parse_run_args(["--struct", p, "--dataset", "digits"])  # every default validates
    assert getattr(cfg, p) == getattr(config_lib.Config(), p)
    cfg = cli.parse_run_args(["--struct", p, f"--{p}_on", f"--{p}_count", "7", f"--{p}_scale",
                              "2", f"--{p}_name", "y", f"--{p}_steps", "9", f"--{p}_cap",
                              "0.25", f"--{p}_mode", "slow"])
    assert [cfg.get(k) for k in kinds] == [True, 7, 2.0, "y", 9, 0.25, "slow"]
    with pytest.raises(config_lib.ConfigError, match=f"--{p}_mode"):
        cli.parse_run_args(["--struct", p, f"--{p}_mode", "medium"])
    with pytest.raises(config_lib.ConfigError, match=f"--{p}_count must be an integer"):
        config_lib.validate(config_lib.Config.from_dict({"struct": p, f"{p}_count": 2.5}))
    assert config_lib.validate(config_lib.Config.from_dict(
        {"struct": p, f"{p}_steps": 4.0})).get(f"{p}_steps") == 4  # a --config file's 4.0
    assert config_lib.validate(config_lib.Config.from_dict(
        {"struct": p, f"{p}_cap": None})).get(f"{p}_cap") is None


CARELESS = '''
import dataclasses

from rsst_jax import config, methods


@dataclasses.dataclass(frozen=True)
class CarelessFlags:
    careless_level: int = config.flag(0, "a flag whose method refuses every configuration")


config.register_group("careless", CarelessFlags)


@methods.register_method
class Careless(methods.Method):
    name = "careless"
    settings = ("careless", CarelessFlags)

    def check(self, cfg, need):
        need(False, "careless refuses everything")

    def next_masks(self, ticket, scoring):
        return ticket.masks, None
'''


def test_an_unrelated_plugin_cannot_break_a_run(tmp_path, monkeypatch, plugin_registry):
    """Only the run's method checks the configuration; a plugin's flag still has its type
    checked; a flag type no command line can parse is refused when its module loads."""
    (tmp_path / "careless_plugin.py").write_text(CARELESS)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("careless_plugin")
    assert cli.parse_run_args(["--dataset", "digits", "--struct", "rsst"]).prune.struct == "rsst"
    with pytest.raises(config_lib.ConfigError, match="careless refuses everything"):
        cli.parse_run_args(["--dataset", "digits", "--struct", "careless"])
    with pytest.raises(config_lib.ConfigError, match="--careless_level must be an integer"):
        config_lib.validate(config_lib.Config.from_dict(dict(careless_level="high")))

    @dataclasses.dataclass(frozen=True)
    class Listy:
        careless_sizes: tuple = config_lib.flag((1, 2), "a tuple: no command line parses it")

    with pytest.raises(ValueError, match="--careless_sizes.*flags are bool, int, float, str"):
        config_lib.register_group("listy", Listy)
    assert "listy" not in config_lib.groups()


# --------------------------------------------------------------------------- methods

def test_the_built_in_methods_are_registered_in_order_and_answer_for_themselves():
    assert methods.available_methods()[:7] == ["none", "refill", "rsst", "slimming", "ssl",
                                               "greg", "group"]
    imp, refill, rsst = (methods.get_method(n) for n in ("none", "refill", "rsst"))
    assert (imp.channels, refill.channels, rsst.channels) == (False, True, True)
    cfg = config_lib.Config()
    assert imp.penalty(cfg) is None and refill.penalty(cfg) is None
    assert rsst.penalty(cfg).schedule is not None  # RSST's lambda, the only schedule built in
    assert [methods.get_method(n).penalty(cfg) is None for n in ("slimming", "ssl", "greg",
                                                                 "group")] == [
        False, False, False, True]
    assert all(methods.get_method(n).paper for n in methods.available_methods()[:7])
    assert [m.label({"fillback_rate": f}) for m, f in ((refill, 0), (refill, 0.3))] == [
        "Refill", "Refill+"]
    assert imp.label({"prune_method": "filter"}) == "filter"
    assert rsst.describe({"RST_schedule": "x", "criteria": "l2"}) == {"criteria": "l2",
                                                                        "schedule": "x"}
    with pytest.raises(ValueError, match="register_method"):
        methods.get_method("nope")
    with pytest.raises(ValueError, match="already registered"):
        @methods.register_method
        class Impostor(methods.Method):
            name = "rsst"


def test_use_mask_bn_default_and_validation_follow_the_method():
    for struct, on in (("none", False), ("refill", True), ("rsst", True)):
        assert config_lib.Config.from_dict(dict(struct=struct)).prune.use_mask_bn is on
    with pytest.raises(config_lib.ConfigError, match="needs --struct refill, rsst"):
        config_lib.validate(config_lib.Config.from_dict(dict(struct="none", fillback_rate=0.5)))
    with pytest.raises(config_lib.ConfigError, match="--block_loss_grad acts only with --struct rsst"):
        config_lib.validate(config_lib.Config.from_dict(dict(struct="none",
                                                             block_loss_grad=True)))


@pytest.mark.slow
def test_a_method_of_your_own_trains_several_tickets_as_one_program(tmp_path, monkeypatch,
                                                                  taylor):
    """The page's method with --num_seeds 2: one engine of two tickets, its programs
    compiled once for every round, two ordinary run directories whose tickets kept whole
    channels and whose epoch rows carry the method's own field, read from its own state."""
    from experiments.run import seed_configs
    use_tiny_data(monkeypatch)
    cfg = tiny_config(tmp_path / "taylor", struct="taylor", rate=0.3, pruning_times=2,
                      num_seeds=2)
    _, run = quiet_run(seed_configs(cfg))
    # one program for both tickets and both rounds: a chunk and the epoch's remainder
    assert run.engine.k == 2 and run.engine.train_chunk._cache_size() <= 2
    for seed in (0, 1):
        d = tmp_path / "taylor" / f"seed_{seed}"
        rows = json.loads((d / "summary.json").read_text())
        assert [r["round"] for r in rows] == [0, 1] and rows[1]["channel_sparsity_pct"] > 0
        log = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]
        assert all(row["taylor_importance"] > 0 for row in log)
        from rsst_jax import checkpoint as ckpt
        tree, _ = ckpt.restore_raw(d / "round_1" / "final")
        for layer in ("conv2", "conv3"):
            m = np.asarray(tree["masks"][layer]["kernel"])
            m = m.reshape(-1, m.shape[-1])
            assert np.all(m.all(0) | ~m.any(0)), layer
