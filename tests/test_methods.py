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
def slimming():
    """examples/slimming.py, the page's method, registered for this test only (its
    method and flags leave with it, so other tests see the built-in configuration)."""
    from rsst_jax.methods import registry
    methods_before, groups_before = dict(registry._REGISTRY), dict(config_lib._GROUPS)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        yield importlib.import_module("examples.slimming")
    finally:
        sys.modules.pop("examples.slimming", None)
        registry._REGISTRY.clear()
        registry._REGISTRY.update(methods_before)
        config_lib._GROUPS.clear()
        config_lib._GROUPS.update(groups_before)


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


def test_a_group_of_flags_joins_the_configuration_and_refuses_taken_names(slimming):
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
    cfg = config_lib.Config.from_dict(dict(struct="slimming", slim_lambda=0.01))
    assert cfg.slimming.slim_lambda == 0.01 and cfg.get("slim_lambda") == 0.01
    assert config_lib.Config.from_dict(cfg.to_dict()) == cfg
    assert "slim_lambda" in config_lib.names_where(finite=True)
    assert "slim_lambda" not in config_lib.names_where(groupable=True)
    assert cli.parse_run_args(["--struct", "slimming", "--slim_lambda", "0.2"]
                              ).slimming.slim_lambda == 0.2
    assert "--slim_lambda" in cli.flags_markdown()
    assert config_lib.plugin_modules(cfg) == ["examples.slimming"]


# --------------------------------------------------------------------------- methods

def test_the_built_in_methods_are_registered_in_order_and_answer_for_themselves():
    assert methods.available_methods()[:3] == ["none", "refill", "rsst"]
    imp, refill, rsst = (methods.get_method(n) for n in ("none", "refill", "rsst"))
    assert (imp.channels, refill.channels, rsst.channels) == (False, True, True)
    assert imp.transform(config_lib.Config()) is None
    assert rsst.transform(config_lib.Config()) is not None
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
    with pytest.raises(config_lib.ConfigError, match="needs --struct refill or rsst"):
        config_lib.validate(config_lib.Config.from_dict(dict(struct="none", fillback_rate=0.5)))
    with pytest.raises(config_lib.ConfigError, match="--block_loss_grad acts on the RSST"):
        config_lib.validate(config_lib.Config.from_dict(dict(struct="none",
                                                             block_loss_grad=True)))


@pytest.mark.slow
def test_a_method_of_your_own_trains_several_tickets_as_one_program(tmp_path, monkeypatch,
                                                                  slimming):
    """The page's method with --num_seeds 2: one engine of two tickets, its programs
    compiled once for every round, two ordinary run directories whose tickets kept whole channels and whose epoch
    rows carry the method's own field."""
    from experiments.run import seed_configs
    use_tiny_data(monkeypatch)
    cfg = tiny_config(tmp_path / "slim", struct="slimming", rate=0.3, pruning_times=2,
                      num_seeds=2, slim_lambda=1e-3)
    _, run = quiet_run(seed_configs(cfg))
    # one program for both tickets and both rounds: a chunk and the epoch's remainder
    assert run.engine.k == 2 and run.engine.train_chunk._cache_size() <= 2
    for seed in (0, 1):
        d = tmp_path / "slim" / f"seed_{seed}"
        rows = json.loads((d / "summary.json").read_text())
        assert [r["round"] for r in rows] == [0, 1] and rows[1]["channel_sparsity_pct"] > 0
        log = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]
        assert all(row["bn_scale_l1"] > 0 for row in log)
        from rsst_jax import checkpoint as ckpt
        tree, _ = ckpt.restore_raw(d / "round_1" / "final")
        for layer in ("conv2", "conv3"):
            m = np.asarray(tree["masks"][layer]["kernel"])
            m = m.reshape(-1, m.shape[-1])
            assert np.all(m.all(0) | ~m.any(0)), layer
