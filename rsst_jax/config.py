"""Run configuration: typed groups of plain values, each flag declared once.

A :class:`Config` holds one frozen group per name: :class:`DataConfig`,
:class:`ModelConfig`, :class:`OptimConfig`, :class:`PruneConfig` and :class:`RunConfig`
here, and the groups pruning methods declare with their own flags
(:func:`register_group`; RSST's ``cfg.rsst`` lives in ``rsst_jax.methods.rsst``). Field
names are the command-line flags (the PyTorch reference's ``main_imp_fillback.py``
names, docs/SPEC.md section 4).

Every field is declared with :func:`flag`, which carries all that is known of the
setting (:class:`Flag`: help text, allowed values, whether tickets of one program may
differ in it, whether it changes results, finiteness, whether it is seed-like). The
command line (``experiments/cli.py``), validation, sweep and seed grouping and the
README's flag table read those facts from here. Saved and replayed as one flat mapping
(``config.json``, ``--config`` files): ``to_dict``/``from_dict``. Nothing here touches
the file system.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import re
import types
import typing
from typing import Any, Mapping, Optional

from rsst_jax import criteria, nets
from rsst_jax.paths import command


# --bn_recalibrate's default re-estimates BatchNorm statistics over at least this many
# training images: one batch of 32 was measured to cost RSST several points of accuracy
# that 4 batches of 32 (and 1 of 128) keep (docs/comparison.md, "Fresh BatchNorm
# statistics").
BN_IMAGES = 128


class ConfigError(ValueError):
    """A flag or config value that cannot work; the message says what to change."""


# --------------------------------------------------------------------------- flags

@dataclasses.dataclass(frozen=True)
class Flag:
    """What is known of one setting, declared with its field (:func:`flag`).

    ``choices``: the allowed values, as ``"module:name"`` of a tuple or of a function
    returning one (read when needed: the module owning an enumeration defines it).
    ``registry``: the function users register their own values with (networks, criteria,
    methods), so validation, not argparse, refuses an unknown value and its message says
    how to register one; ``"dataset"`` (no function: the set is fixed) only moves the
    check to validation, whose message lists the data sets.
    ``groupable``: tickets trained as one program may differ in it (no shape or compiled
    code depends on it). ``semantic``: it changes what a run computes (a resumed run
    must agree on it). ``finite``: a number that must be finite. ``seed_like``: runs of
    one configuration and different seeds differ in it. ``method_only``: a flag of a
    method's own group that acts only with that method (RSST's ``--block_loss_grad``):
    given away from its default with another ``--struct``, validation refuses it."""
    help: str
    choices: Optional[str] = None
    registry: Optional[str] = None
    groupable: bool = False
    semantic: bool = True
    finite: bool = False
    seed_like: bool = False
    method_only: bool = False

    def allowed(self) -> Optional[tuple]:
        if self.choices is None:
            return None
        module, _, name = self.choices.partition(":")
        value = getattr(importlib.import_module(module), name)
        return tuple(value() if callable(value) else value)


def flag(default, help: str, **facts) -> Any:
    """A configuration field with its :class:`Flag` facts."""
    return dataclasses.field(default=default, metadata={"flag": Flag(help, **facts)})


# --------------------------------------------------------------------------- groups

@dataclasses.dataclass(frozen=True)
class DataConfig:
    data: Optional[str] = flag(
        None, "data directory (default: the data set's usual place; fashion_mnist: "
        "/usr/share/datasets/fashion-mnist, cifar: ./data)", groupable=True, semantic=False)
    dataset: str = flag(
        "cifar100", "data set: digits (bundled, always works), fashion_mnist, cifar10, "
        "cifar100, tiny-imagenet", choices="rsst_jax.data:DATASETS", registry="dataset")
    train_subset: Optional[int] = flag(
        None, "(new) train on a fixed stratified subset of this many training images (the "
        "same images for every seed and run; validation and test unchanged); default: the "
        "whole training split")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str = flag("res20s", "network (see rsst_jax.nets.available_nets())",
                     choices="rsst_jax.nets:available_nets",
                     registry="rsst_jax.nets.register_net")
    shortcut: str = flag("A", "(new) CIFAR ResNet shortcut: A (parameter-free) or B (1x1 conv "
                         "+ BN)", choices="rsst_jax.nets.resnet_cifar:SHORTCUTS")
    precision: str = flag("fp32", "(new) compute precision: bf16 computes in bfloat16 with "
                          "float32 weights, optimizer state and BatchNorm statistics",
                          choices="rsst_jax.train:PRECISIONS")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    batch_size: int = flag(128, "training batch size")
    lr: float = flag(0.01, "initial learning rate", groupable=True, finite=True)
    momentum: float = flag(0.9, "SGD momentum", finite=True)
    weight_decay: float = flag(1e-4, "weight decay, coupled (added to the gradient as "
                               "PyTorch SGD does)", finite=True)
    epochs: int = flag(120, "epochs per round")
    warmup: int = flag(20, "linear per-step learning-rate warm-up, in epochs")
    decreasing_lr: str = flag("91,136", "epochs at which the learning rate is multiplied by "
                              "0.1")
    optimizer: str = flag("sgd", "(new) optimizer (adam/adamw often suit fine-tuning with lr "
                          "0.001)", choices="rsst_jax.train:OPTIMIZERS")
    eval_batch_size: int = flag(500, "(new) evaluation batch size", groupable=True,
                                semantic=False)
    bn_recalibrate: Optional[int] = flag(
        None, "(new) before each evaluation in rounds that end by removing channels (RSST, "
        "GReg: every epoch, and after applying S) re-estimate the BatchNorm running "
        "statistics as the mean over this many training batches (a fixed set, not "
        "augmented); the saved tickets keep them; 0: off; default: the fewest batches "
        f"that hold {BN_IMAGES} images (1 at --batch_size 128, 4 at 32; at most the "
        "training set's)")
    accum_steps: int = flag(1, "(new) gradient accumulation micro-batches per step")
    distill: bool = flag(False, "(new) distil from the dense round-0 network in later rounds")
    kd_alpha: float = flag(0.5, "(new) weight of the distillation loss", finite=True)
    kd_temperature: float = flag(4.0, "(new) distillation temperature", finite=True)

    @property
    def milestones(self) -> tuple[int, ...]:
        return parse_int_list(self.decreasing_lr, "--decreasing_lr")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    pruning_times: int = flag(20, "rounds of training; 1 is plain dense training")
    rate: float = flag(0.2, "fraction of the remaining prunable weights removed after each "
                       "round", groupable=True, finite=True)
    prune_type: str = flag("lt", "rewinding: lt (to W0), rewind_lt (to epoch --rewind_epoch "
                           "of round 0), pt (to --pretrained)",
                           choices="rsst_jax.rounds:PRUNE_TYPES")
    pretrained: Optional[str] = flag(
        None, "pretrained weights for --prune_type pt (rsst-jax checkpoint, PyTorch "
        "state_dict or .npz); the classifier and the stem convolution stay freshly "
        "initialized, as in the reference")
    conv1: bool = flag(False, "also prune the stem convolution")
    fc: bool = flag(False, "accepted as in the reference, where it rewinds the classifier; "
                    "every layer is rewound here, so it changes nothing (prune dense kernels "
                    "with --prune_fc)")
    prune_fc: bool = flag(False, "(new) also prune dense (classifier) kernels")
    rewind_epoch: int = flag(24, "epoch of round 0 whose weights are the rewind point "
                             "(rewind_lt)")
    prune_scope: str = flag("global", "(new) rank weights over all layers or within each "
                            "layer", choices="rsst_jax.masks:SCOPES")
    prune_method: str = flag("magnitude", "(new) magnitude (IMP), random (baseline) or filter "
                             "(structured L1 filter pruning)",
                             choices="rsst_jax.masks:PRUNE_METHODS")
    rate_schedule: str = flag("", "(new) comma-separated multipliers of --rate per prune step "
                              "(the last one repeats), e.g. 1,1,0.5", groupable=True)
    layer_rates: str = flag("", "(new) per-layer multipliers of --rate, REGEX=MULT,... over "
                            "parameter paths, e.g. layer1=0.5,layer3=1.5 (implies layerwise "
                            "ranking)")
    struct: str = flag("rsst", "pruning method: none (IMP), refill, rsst, or a baseline "
                       "(slimming, ssl, greg, group; docs/baselines.md), or any method "
                       "registered with rsst_jax.methods.register_method (docs/methods.md)",
                       choices="rsst_jax.methods.registry:available_methods",
                       registry="rsst_jax.methods.register_method")
    fillback_rate: float = flag(0.0, "Refill+: fraction of the pruned channels given back",
                                groupable=True, finite=True)
    criteria: str = flag("l1", "channel criterion: remain, magnitude, l1, l2, saliency, "
                         "hessian, or any name registered with "
                         "rsst_jax.criteria.register_criterion", groupable=True,
                         choices="rsst_jax.criteria:available_criteria",
                         registry="rsst_jax.criteria.register_criterion")
    criteria_batches: int = flag(1, "(new) training batches used for activation-based "
                                 "criteria", groupable=True)
    hessian_samples: int = flag(8, "(new) Hutchinson probes for --criteria hessian",
                                groupable=True)
    mask_bn: Optional[bool] = flag(
        None, "(new) channel masks also zero and freeze the following BatchNorm (default: on "
        "for methods that keep whole channels: refill, rsst)")
    score_after_prune: bool = flag(
        False, "(new) score channels on the weights left after the round's magnitude prune, "
        "not on the trained weights as the reference does (how rsst-jax 0.1 scored)",
        groupable=True)

    @property
    def prune_dense(self) -> bool:
        """Whether dense kernels are prunable: ``--prune_fc`` only (the reference's
        ``--fc`` is about rewinding the classifier and never prunes it)."""
        return self.prune_fc

    @property
    def use_mask_bn(self) -> bool:
        """``--mask_bn``, by default on for a method that keeps whole channels."""
        if self.mask_bn is not None:
            return self.mask_bn
        from rsst_jax.methods.registry import get_method  # cycle: rsst_jax.methods imports this one
        return get_method(self.struct).channels

    @property
    def rate_multipliers(self) -> tuple[float, ...]:
        return parse_float_list(self.rate_schedule, "--rate_schedule") or (1.0,)

    def rate_at(self, prune_step: int) -> float:
        mult = self.rate_multipliers
        return self.rate * mult[min(prune_step, len(mult) - 1)]

    @property
    def layer_rate_map(self) -> dict[str, float]:
        return parse_layer_rates(self.layer_rates)

    @property
    def scope(self) -> str:
        """The ranking scope used: per-layer rates imply a layerwise ranking."""
        return "layerwise" if self.layer_rate_map else self.prune_scope


@dataclasses.dataclass(frozen=True)
class RunConfig:
    seed: Optional[int] = flag(None, "random seed (None means 0)", groupable=True,
                               seed_like=True)
    save_dir: str = flag("results", "directory for checkpoints, logs and summaries",
                         groupable=True, semantic=False, seed_like=True)
    resume: bool = flag(False, "continue the run in --save_dir from its newest checkpoint",
                        groupable=True, semantic=False)
    checkpoint: Optional[str] = flag(None, "checkpoint directory to resume from (default: the "
                                     "newest one in --save_dir)", groupable=True,
                                     semantic=False)
    init: Optional[str] = flag(None, "initialization W0: loaded if it exists, else written "
                               "there (default: SAVE_DIR/init)", groupable=True,
                               seed_like=True)
    print_freq: int = flag(50, "steps between progress-bar refreshes", groupable=True,
                           semantic=False)
    fused: str = flag("auto", "(new) run --fused_steps steps at a time as one compiled "
                      "program (on CPU unrolled, where XLA runs convolution gradients inside "
                      "a loop far slower): on, off, or auto (on where it is faster, see "
                      "docs/performance.md)", semantic=False,  # equal results, tested
                      choices="rsst_jax.train:FUSED_MODES")
    fused_steps: Optional[int] = flag(
        None, "(new) steps per fused chunk; the progress bar advances per chunk (when not "
        "given: --print_freq on GPU/TPU, 8 on CPU, where compile time grows with it)",
        semantic=False)
    num_seeds: int = flag(1, "(new) train this many tickets (seeds --seed, --seed+1, ...) "
                          "together as one program (vmapped on accelerators), each written to "
                          "SAVE_DIR/seed_<s>/", groupable=True, seed_like=True)
    nan_policy: str = flag("stop", "(new) on a NaN/Inf loss: stop the round, or skip the batch",
                           choices="rsst_jax.train:NAN_POLICIES")
    wandb: Optional[str] = flag(
        None, "(new) also log to Weights & Biases project [ENTITY/]PROJECT, one W&B run per "
        "ticket named after its run directory, grouped by the parent directory (needs pip "
        "install -e \".[wandb]\"; WANDB_MODE=offline keeps it local). TensorBoard event "
        "files are always written: tensorboard --logdir SAVE_DIR", semantic=False)
    config: Optional[str] = flag(None, "(new) YAML or TOML file supplying any flag; "
                                 "command-line flags override it", groupable=True,
                                 semantic=False)
    dry_run: bool = flag(False, "(new) check everything, print the plan and exit",
                         groupable=True, semantic=False)

    @property
    def resolved_seed(self) -> int:
        return 0 if self.seed is None else self.seed


# Group name -> dataclass of flags. The run group stays last (--help, config.json).
_GROUPS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
                            "prune": PruneConfig}
_LAST = {"run": RunConfig}


def register_group(name: str, cls: type) -> type:
    """Add a group of flags (a frozen dataclass whose fields are declared with
    :func:`flag`), reached as ``cfg.<name>``; a pruning method declares its own flags so.
    Registering the same class again does nothing; a flag name already taken is an error."""
    groups = {**_GROUPS, **_LAST}
    if groups.get(name) is cls:
        return cls
    if name in groups or name in dir(Config):
        raise ValueError(f"configuration group {name!r} already exists")
    taken = set(group_of_flags())
    for f in dataclasses.fields(cls):
        if "flag" not in f.metadata:
            raise ValueError(f"{cls.__name__}.{f.name}: declare it with rsst_jax.config.flag")
        if f.name in taken:
            raise ValueError(f"{cls.__name__}.{f.name}: flag --{f.name} already exists")
    _GROUPS[name] = cls
    try:  # a type no command line can parse is refused here, at the plugin's import
        for f in dataclasses.fields(cls):
            flag_type(f.name)
    except ConfigError as e:
        del _GROUPS[name]
        raise ValueError(str(e)) from None
    return cls


def groups() -> dict[str, type]:
    """Every group of flags, in order (the run group last)."""
    return {**_GROUPS, **_LAST}


def group_of_flags() -> dict[str, str]:
    """Flag name -> name of its group, in flag order."""
    return {f.name: g for g, cls in groups().items() for f in dataclasses.fields(cls)}


def flag_names() -> tuple[str, ...]:
    """Every flag, in the order of --help, config.json and the README's flag table."""
    return tuple(group_of_flags())


def field_of(name: str) -> dataclasses.Field:
    """The dataclass field of flag ``name`` (type, default)."""
    group = groups()[group_of_flags()[name]]
    return next(f for f in dataclasses.fields(group) if f.name == name)


def facts(name: str) -> Flag:
    """The :class:`Flag` facts of flag ``name``."""
    return field_of(name).metadata["flag"]


@dataclasses.dataclass(frozen=True)
class FlagType:
    """What a flag's annotation says: its ``base`` type (bool, int, float or str),
    whether None is allowed (``Optional[X]``, ``X | None``) and the values of a
    ``Literal[...]`` (its choices), read with ``typing.get_type_hints``, so with or
    without ``from __future__ import annotations`` in the module declaring it."""
    base: type
    optional: bool = False
    literal: Optional[tuple] = None


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception as e:  # noqa: BLE001  a name the annotation uses is not importable
        raise ConfigError(f"cannot read the flag types of {cls.__module__}.{cls.__name__}: "
                          f"{e}") from None


def flag_type(name: str) -> FlagType:
    """The :class:`FlagType` of flag ``name``; ConfigError for an annotation other than
    bool, int, float, str, Optional[...] of one of them, or a Literal of one kind."""
    group = groups()[group_of_flags()[name]]
    hint = _hints(group)[name]
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        hint = rest[0] if len(rest) == 1 else hint
    if typing.get_origin(hint) is typing.Literal:
        values = typing.get_args(hint)
        kinds = {type(v) for v in values}
        if len(kinds) == 1 and kinds <= {bool, int, float, str}:
            return FlagType(kinds.pop(), optional, tuple(values))
    elif hint in (bool, int, float, str):
        return FlagType(hint, optional)
    raise ConfigError(f"--{name} ({group.__module__}.{group.__name__}): flags are bool, int, "
                      f"float, str, Optional[...] of one of them or a Literal[...] of one "
                      f"kind; got {hint!r}")


def names_where(**wanted) -> tuple[str, ...]:
    """The flags whose facts have the given values, e.g. ``names_where(groupable=True)``."""
    return tuple(n for n in flag_names()
                 if all(getattr(facts(n), k) == v for k, v in wanted.items()))


class Config:
    """One run's configuration: a frozen group per name of :func:`groups`
    (``cfg.optim.lr``, ``cfg.prune.struct``, ...). Equal when every value is equal."""

    __slots__ = ("_groups",)

    def __init__(self, **given):
        unknown = sorted(set(given) - set(groups()))
        if unknown:
            raise ConfigError(f"unknown configuration groups {', '.join(unknown)}")
        object.__setattr__(self, "_groups", {
            name: given.get(name) or cls() for name, cls in groups().items()})

    def __getattr__(self, name: str):
        try:
            return object.__getattribute__(self, "_groups")[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __eq__(self, other) -> bool:
        return isinstance(other, Config) and self._groups == other._groups

    def __hash__(self) -> int:
        return hash(tuple(self._groups.values()))

    def __repr__(self) -> str:
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in self._groups.items()) + ")"

    def __reduce__(self):
        return (_config_of, (self.to_dict(),))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Config":
        """A Config from a flat mapping of flag names (missing ones take their default);
        ConfigError on unknown names."""
        unknown = sorted(set(values) - set(group_of_flags()))
        if unknown:
            raise ConfigError(f"unknown settings {', '.join(unknown)} (see "
                              f"{command('experiments.run', ['--help'])}; a method's own flags "
                              f"need --import of the module that registers it)")
        return cls().replace(**values)

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping of every flag, in flag order (what config.json holds)."""
        return {name: getattr(self._groups[g], name) for name, g in group_of_flags().items()}

    def replace(self, **values) -> "Config":
        """A copy with the flags named in ``values`` changed (flat names)."""
        where = group_of_flags()
        by_group: dict[str, dict] = {}
        for name, value in values.items():
            if name not in where:
                raise ConfigError(f"unknown setting {name!r}")
            by_group.setdefault(where[name], {})[name] = value
        return Config(**{g: dataclasses.replace(v, **by_group[g]) if g in by_group else v
                         for g, v in self._groups.items()})

    def get(self, name: str) -> Any:
        """The value of flag ``name``."""
        return getattr(self._groups[group_of_flags()[name]], name)


def _config_of(values: dict) -> Config:
    return Config.from_dict(values)


def semantic_diffs(saved: dict, now: dict, limit: int = 5) -> str:
    """'--k saved (now new), ...' for the semantic flags where ``now`` differs from the
    ``saved`` config dict; flags ``saved`` lacks count as their default (a run written
    before the flag existed); '' when they agree."""
    known = group_of_flags()

    def before(k):
        return saved[k] if k in saved else field_of(k).default
    diffs = [k for k, v in now.items() if k in known and facts(k).semantic and before(k) != v]
    return ", ".join(f"--{k} {before(k)!r} (now {now[k]!r})" for k in diffs[:limit])


def program_key(cfg) -> Optional[tuple]:
    """What tickets trained as one program must share: the values of every flag not
    declared groupable, as a hashable tuple; None for a configuration that trains alone
    (--distill: one ticket per program). Configurations may train as one program exactly
    when their keys are equal and not None (the one rule of ``check_groupable`` and of
    the sweep's grouping of cells)."""
    if cfg.optim.distill:
        return None
    return tuple((k, v) for k, v in cfg.to_dict().items() if not facts(k).groupable)


def check_groupable(configs) -> None:
    """ConfigError unless ``configs`` may train as one program (``program_key``)."""
    key = program_key(configs[0])
    if len(configs) > 1 and key is None:
        raise ConfigError("--distill trains one ticket per program; run the tickets separately")
    first = configs[0].to_dict()
    for cfg in configs[1:]:
        if program_key(cfg) == key:
            continue
        other = cfg.to_dict()
        diff = sorted(k for k in first if not facts(k).groupable and first[k] != other[k])
        raise ConfigError(f"tickets trained as one program must agree on {', '.join(diff)}")


# --------------------------------------------------------------------------- parsing values

def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in str(text).replace(" ", "").split(",") if t)
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integers, got {text!r}") from None


def parse_float_list(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in str(text).replace(" ", "").split(",") if t)
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def parse_layer_rates(text: str) -> dict[str, float]:
    out = {}
    for item in (t for t in str(text).split(",") if t.strip()):
        pattern, sep, mult = item.partition("=")
        try:
            if not sep:
                raise ValueError
            re.compile(pattern)
            out[pattern.strip()] = float(mult)
        except (ValueError, re.error):
            raise ConfigError(f"--layer_rates wants REGEX=MULT pairs such as layer1=0.5,layer3=1.5; "
                              f"bad item {item!r}") from None
    return out


def choices() -> dict[str, tuple]:
    """The allowed values of every enumerated flag: read from the modules that own them
    (``Flag.choices``), or the values of its ``Literal[...]`` annotation."""
    out = {}
    for name in flag_names():
        if facts(name).choices is not None:
            out[name] = facts(name).allowed()
        elif flag_type(name).literal is not None:
            out[name] = flag_type(name).literal
    return out


def plugin_modules(cfg: "Config") -> list[str]:
    """The modules outside rsst_jax that registered ``cfg``'s network, criterion, method or
    flags (what a printed command must ``--import`` to run or read it again)."""
    from rsst_jax.methods import registry as methods  # cycle: rsst_jax.methods imports this one
    found = [nets.registered_module(cfg.model.arch),
             criteria.registered_module(cfg.prune.criteria),
             methods.registered_module(cfg.prune.struct),
             *(cls.__module__ for cls in groups().values())]
    return list(dict.fromkeys(m for m in found
                              if m and m != "__main__" and m.split(".")[0] != "rsst_jax"))


def _checked_value(name: str, value: Any, allowed: Optional[tuple]) -> Any:
    """``value`` as the type of flag ``name`` (values from --config files arrive untyped);
    ConfigError when it cannot be one."""
    kind = flag_type(name)
    flag = f"--{name}"
    if value is None and kind.optional:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind.base is bool:
        ok, out, want = isinstance(value, bool), value, "true or false"
    elif kind.base is int:
        integral = number and (isinstance(value, int) or value.is_integer())
        ok, out, want = integral, int(value) if integral else value, "an integer"
    elif kind.base is float:
        ok, out, want = number, float(value) if number else value, "a number"
    else:  # str; YAML turns "91" into 91 and "91,136" may be written as a list
        if isinstance(value, (list, tuple)) and all(
                isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in value):
            value = ",".join(str(v) for v in value)
        ok, out, want = isinstance(value, str) or number, str(value), "a string"
    if not ok:
        raise ConfigError(f"{flag} must be {want}, got {value!r}")
    if allowed is not None and out not in allowed:
        registry = facts(name).registry
        if registry is not None:  # users add their own
            how = (f"; or register your own with {registry} in a module and pass --import "
                   f"MODULE" if "." in registry else "")
            raise ConfigError(f"unknown {flag} {out!r}; choose one of: {', '.join(allowed)}{how}")
        raise ConfigError(f"{flag} must be one of {', '.join(map(str, allowed))}, got {out!r}")
    return out


def validate(cfg: Config) -> Config:
    """Check every value and combination before any compute; raise ConfigError.

    Returns the config with values from a --config file converted to the field types.
    Pure: nothing here looks at the file system (see ``experiments.cli``). Each
    registered method checks its own flags (``Method.check``).
    """
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    allowed = choices()
    flat = {name: _checked_value(name, value, allowed.get(name))
            for name, value in cfg.to_dict().items()}
    cfg = Config.from_dict(flat)
    m, o, p, r = cfg.model, cfg.optim, cfg.prune, cfg.run
    for name in names_where(finite=True):
        value = flat[name]
        need(value is None or math.isfinite(value), f"--{name} must be a finite number, got {value}")
    need(r.seed is None or 0 <= r.seed < 2 ** 32, f"--seed must be in [0, 2**32), got {r.seed}")
    for name, value in flat.items():  # counts end up in int32 arrays
        need(name == "seed" or not isinstance(value, int) or abs(value) < 2 ** 31,
             f"--{name} {value} is out of range")
    need(p.pruning_times <= 1000, f"--pruning_times must be <= 1000, got {p.pruning_times}")
    need(r.save_dir.strip() != "", "--save_dir must name a directory")
    from rsst_jax.methods import registry as methods  # cycle: rsst_jax.methods imports this one
    need(m.shortcut == "A" or "shortcut" in nets.net_options(m.arch),
         f"--shortcut applies to the CIFAR ResNets (res20s ... res110s), not to {m.arch}")
    need(0.0 <= p.rate < 1.0, f"--rate must be in [0, 1), got {p.rate}")
    need(0.0 <= p.fillback_rate <= 1.0, f"--fillback_rate must be in [0, 1], got {p.fillback_rate}")
    need(o.batch_size >= 1, f"--batch_size must be >= 1, got {o.batch_size}")
    need(cfg.data.train_subset is None or cfg.data.train_subset >= 1,
         f"--train_subset must be >= 1 image, got {cfg.data.train_subset}")
    need(o.eval_batch_size >= 1, f"--eval_batch_size must be >= 1, got {o.eval_batch_size}")
    need(o.bn_recalibrate is None or o.bn_recalibrate >= 0,
         f"--bn_recalibrate must be >= 0 batches, got {o.bn_recalibrate}")
    need(o.epochs >= 1, f"--epochs must be >= 1, got {o.epochs}")
    need(o.warmup >= 0, f"--warmup must be >= 0, got {o.warmup}")
    need(p.pruning_times >= 1, f"--pruning_times must be >= 1 (1 = dense training only), "
         f"got {p.pruning_times}")
    need(o.lr > 0, f"--lr must be a positive number, got {o.lr}")
    need(0.0 <= o.momentum < 1.0, f"--momentum must be in [0, 1), got {o.momentum}")
    need(o.weight_decay >= 0, f"--weight_decay must be >= 0, got {o.weight_decay}")
    need(r.print_freq >= 1, f"--print_freq must be >= 1, got {r.print_freq}")
    need(all(ms > 0 for ms in o.milestones),
         f"--decreasing_lr epochs must be positive: {o.decreasing_lr}")
    mults = p.rate_multipliers
    need(all(0 <= p.rate * mult < 1 for mult in mults),
         f"--rate_schedule multipliers times --rate must stay in [0, 1): {p.rate_schedule}")
    layer_rates = p.layer_rate_map  # parses --layer_rates or raises ConfigError
    if p.prune_type == "rewind_lt":
        need(0 <= p.rewind_epoch < o.epochs,
             f"--rewind_epoch {p.rewind_epoch} must be below --epochs {o.epochs} "
             f"for --prune_type rewind_lt")
    if p.prune_type == "pt":
        need(p.pretrained is not None, "--prune_type pt needs --pretrained CHECKPOINT")
    method = methods.get_method(p.struct)
    need(not (method.channels and p.prune_method == "filter"),
         f"--struct {p.struct} with --prune_method filter makes no sense: filter pruning is "
         f"already channel-wise; use --struct none")
    need(p.criteria_batches >= 1, f"--criteria_batches must be >= 1, got {p.criteria_batches}")
    need(p.hessian_samples >= 1, f"--hessian_samples must be >= 1, got {p.hessian_samples}")
    need(o.accum_steps >= 1, "--accum_steps must be >= 1")
    need(o.kd_temperature > 0, "--kd_temperature must be > 0")
    need(0 <= o.kd_alpha <= 1, "--kd_alpha must be in [0, 1]")
    need(o.warmup <= o.epochs,
         f"--warmup {o.warmup} is longer than --epochs {o.epochs}: the learning rate would "
         f"never reach --lr; pass a --warmup of at most {o.epochs} (e.g. --warmup 0)")
    if layer_rates:
        need(p.prune_method == "magnitude",
             f"--layer_rates applies to --prune_method magnitude, not {p.prune_method}")
        top = p.rate * max(mults)
        for pattern, mult in layer_rates.items():
            need(mult >= 0 and top * mult < 1,
                 f"--layer_rates {pattern}={mult}: --rate {p.rate} times it must stay in [0, 1) "
                 f"(1 or more would remove every remaining weight of those layers)")
    need(p.pretrained is None or p.prune_type == "pt",
         "--pretrained is only used with --prune_type pt; add --prune_type pt or leave it out")
    need(r.checkpoint is None or r.resume,
         "--checkpoint names where to resume from; add --resume or leave it out")
    names = [m.name for m in methods.registered() if m.channels]
    need(p.fillback_rate == 0 or method.channels,
         f"--fillback_rate refills channels, which needs --struct "
         f"{', '.join(names[:-1]) + ' or ' if len(names) > 1 else ''}{names[-1]}")
    method.check(cfg, need)  # the run's method only: another's flags cannot break this run
    own = method.settings[0] if method.settings else None
    for name, group in group_of_flags().items():
        if facts(name).method_only and group != own and flat[name] != field_of(name).default:
            owners = [m.name for m in methods.registered() if (m.settings or (None,))[0] == group]
            need(False, f"--{name} acts only with --struct {owners[0] if owners else group} "
                 f"(got --struct {p.struct}); leave it out")
    need(o.batch_size % o.accum_steps == 0, f"--batch_size {o.batch_size} must be a "
         f"multiple of --accum_steps {o.accum_steps} (the micro-batches are equal)")
    need(r.fused_steps is None or r.fused_steps >= 1, "--fused_steps must be >= 1")
    need(r.num_seeds >= 1, f"--num_seeds must be >= 1, got {r.num_seeds}")
    need(r.num_seeds == 1 or not o.distill, "--num_seeds > 1 with --distill is not "
         "supported; run the seeds separately")
    return cfg


__all__ = ["ConfigError", "Config", "Flag", "FlagType", "flag", "flag_type", "DataConfig",
           "ModelConfig",
           "OptimConfig", "PruneConfig", "RunConfig", "register_group", "groups",
           "group_of_flags", "flag_names", "field_of", "facts", "names_where",
           "semantic_diffs", "program_key", "check_groupable", "parse_int_list", "parse_float_list",
           "parse_layer_rates", "choices", "validate", "plugin_modules"]
