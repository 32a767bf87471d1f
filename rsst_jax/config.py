"""Run configuration: typed groups of plain values, nothing else.

A :class:`Config` is six frozen groups, each a dataclass whose field names are the
command-line flags (the PyTorch reference's ``main_imp_fillback.py`` names,
docs/SPEC.md section 4): :class:`DataConfig`, :class:`ModelConfig`, :class:`OptimConfig`,
:class:`PruneConfig`, :class:`RSSTConfig` and :class:`RunConfig`. Saved and replayed
as one flat mapping (``config.json``, ``--config`` files): ``to_dict``/``from_dict``.

The command line (argparse, help texts, the flag table) lives in ``experiments/cli.py``;
the enumerations (schedules, criteria, scopes, methods, networks, data sets) belong to
the modules that implement them and :func:`validate` reads them from there. Nothing here
touches the file system.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Optional


class ConfigError(ValueError):
    """A flag or config value that cannot work; the message says what to change."""


# --------------------------------------------------------------------------- groups

@dataclasses.dataclass(frozen=True)
class DataConfig:
    data: Optional[str] = None          # directory (None: the data set's usual place)
    dataset: str = "cifar100"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str = "res20s"
    shortcut: str = "A"                 # CIFAR ResNets: A (padding) or B (1x1 conv + BN)
    precision: str = "fp32"             # compute dtype; weights and statistics stay fp32


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4          # coupled for sgd/adam, as PyTorch
    epochs: int = 120                   # per round
    warmup: int = 20                    # epochs of linear per-step warm-up
    decreasing_lr: str = "91,136"       # epochs where lr *= 0.1
    optimizer: str = "sgd"
    eval_batch_size: int = 500
    bn_recalibrate: int = 0             # batches; 0: evaluate with the running statistics
    accum_steps: int = 1
    distill: bool = False               # distil from the dense round-0 network
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0

    @property
    def milestones(self) -> tuple[int, ...]:
        return parse_int_list(self.decreasing_lr, "--decreasing_lr")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    pruning_times: int = 20             # rounds; 1 = dense training only
    rate: float = 0.2
    prune_type: str = "lt"              # rewind to W0, to --rewind_epoch, or to --pretrained
    pretrained: Optional[str] = None
    conv1: bool = False                 # prune the stem convolution too
    fc: bool = False                    # the reference's "rewind fc": no effect on pruning
    prune_fc: bool = False              # prune dense (classifier) kernels too
    rewind_epoch: int = 24
    prune_scope: str = "global"
    prune_method: str = "magnitude"
    rate_schedule: str = ""             # multipliers of rate per prune step
    layer_rates: str = ""               # REGEX=MULT,...
    struct: str = "rsst"
    fillback_rate: float = 0.0
    criteria: str = "l1"
    criteria_batches: int = 1
    hessian_samples: int = 8
    mask_bn: Optional[bool] = None      # None: on for refill/rsst
    score_after_prune: bool = False     # channel scores from the pruned, not the trained, weights

    @property
    def prune_dense(self) -> bool:
        """Whether dense kernels are prunable: ``--prune_fc`` only (the reference's
        ``--fc`` is about rewinding the classifier and never prunes it)."""
        return self.prune_fc

    @property
    def use_mask_bn(self) -> bool:
        return self.struct != "none" if self.mask_bn is None else self.mask_bn

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
class RSSTConfig:
    block_loss_grad: bool = False
    RST_schedule: str = "exp_custom_exponents"
    reg_granularity_prune: float = 1.0
    exponents: float = 4.0
    reg_upper_limit: Optional[float] = None
    update_reg_interval: Optional[int] = None
    reg_progress: str = "round"
    reg_adaptive: bool = False
    target_acc: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    seed: Optional[int] = None          # None means 0
    save_dir: str = "results"
    resume: bool = False
    checkpoint: Optional[str] = None
    init: Optional[str] = None
    print_freq: int = 50
    fused: str = "auto"
    fused_steps: Optional[int] = None
    num_seeds: int = 1
    nan_policy: str = "stop"
    wandb: Optional[str] = None         # [ENTITY/]PROJECT of Weights & Biases
    config: Optional[str] = None        # the --config file this came from
    dry_run: bool = False

    @property
    def resolved_seed(self) -> int:
        return 0 if self.seed is None else self.seed


GROUPS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
          "prune": PruneConfig, "rsst": RSSTConfig, "run": RunConfig}

# Flag order of --help and of the README's flag table (the reference's order first).
FLAG_ORDER = (
    "data", "dataset", "arch", "shortcut", "seed", "save_dir", "resume", "checkpoint", "init",
    "batch_size", "lr", "momentum", "weight_decay", "epochs", "warmup", "print_freq",
    "decreasing_lr", "optimizer", "eval_batch_size", "bn_recalibrate", "pruning_times", "rate",
    "prune_type",
    "pretrained", "conv1", "fc", "prune_fc", "rewind_epoch", "prune_scope", "prune_method",
    "rate_schedule", "layer_rates", "struct", "fillback_rate", "criteria", "criteria_batches",
    "hessian_samples", "mask_bn", "score_after_prune", "block_loss_grad", "RST_schedule",
    "reg_granularity_prune", "exponents", "reg_upper_limit", "update_reg_interval",
    "reg_progress", "reg_adaptive", "target_acc", "distill", "kd_alpha", "kd_temperature",
    "accum_steps", "precision", "fused", "fused_steps", "num_seeds", "nan_policy", "wandb",
    "config", "dry_run")

# flag name -> group attribute
GROUP_OF = {f.name: g for g, cls in GROUPS.items() for f in dataclasses.fields(cls)}
assert set(GROUP_OF) == set(FLAG_ORDER) and len(GROUP_OF) == len(FLAG_ORDER)


def field_of(name: str) -> dataclasses.Field:
    """The dataclass field of flag ``name`` (type, default)."""
    return next(f for f in dataclasses.fields(GROUPS[GROUP_OF[name]]) if f.name == name)


@dataclasses.dataclass(frozen=True)
class Config:
    """One run's configuration, grouped; ``cfg.optim.lr``, ``cfg.prune.struct``, ..."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    prune: PruneConfig = dataclasses.field(default_factory=PruneConfig)
    rsst: RSSTConfig = dataclasses.field(default_factory=RSSTConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Config":
        """A Config from a flat mapping of flag names (missing ones take their default);
        ConfigError on unknown names."""
        unknown = sorted(set(values) - set(GROUP_OF))
        if unknown:
            raise ConfigError(f"unknown settings {', '.join(unknown)} "
                              f"(see python -m experiments.run --help)")
        return cls().replace(**values)

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping of every flag, in ``FLAG_ORDER`` (what config.json holds)."""
        return {name: getattr(getattr(self, GROUP_OF[name]), name) for name in FLAG_ORDER}

    def replace(self, **values) -> "Config":
        """A copy with the flags named in ``values`` changed (flat names)."""
        by_group: dict[str, dict] = {}
        for name, value in values.items():
            if name not in GROUP_OF:
                raise ConfigError(f"unknown setting {name!r}")
            by_group.setdefault(GROUP_OF[name], {})[name] = value
        return dataclasses.replace(self, **{g: dataclasses.replace(getattr(self, g), **kw)
                                            for g, kw in by_group.items()})

    def get(self, name: str) -> Any:
        """The value of flag ``name``."""
        return getattr(getattr(self, GROUP_OF[name]), name)


# Fields that do not change what a run computes, so a resumed run may differ in them.
NON_SEMANTIC = ("resume", "checkpoint", "print_freq", "dry_run", "config", "save_dir", "data",
                "eval_batch_size", "fused", "fused_steps",  # fused: equal results, tested
                "wandb")


def semantic_diffs(saved: dict, now: dict, limit: int = 5) -> str:
    """'--k saved (now new), ...' for the semantic fields where ``now`` differs from the
    ``saved`` config dict; fields ``saved`` lacks count as their default (a run written
    before the field existed); '' when they agree."""
    def before(k):
        return saved[k] if k in saved else field_of(k).default
    diffs = [k for k, v in now.items() if k not in NON_SEMANTIC and k in GROUP_OF
             and before(k) != v]
    return ", ".join(f"--{k} {before(k)!r} (now {now[k]!r})" for k in diffs[:limit])


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


def choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of every enumerated flag, read from the modules that own them."""
    from rsst_jax import criteria, data, masks, nets, regularizers, rounds, train
    from rsst_jax.nets import resnet_cifar
    return {"dataset": tuple(data.DATASETS), "arch": tuple(nets.available_nets()),
            "shortcut": tuple(resnet_cifar.SHORTCUTS), "precision": tuple(train.PRECISIONS),
            "optimizer": tuple(train.OPTIMIZERS), "prune_type": tuple(rounds.PRUNE_TYPES),
            "prune_scope": tuple(masks.SCOPES), "prune_method": tuple(masks.PRUNE_METHODS),
            "struct": tuple(rounds.STRUCTS), "criteria": tuple(criteria.available_criteria()),
            "RST_schedule": tuple(regularizers.SCHEDULES),
            "reg_progress": tuple(regularizers.PROGRESS), "fused": tuple(train.FUSED_MODES),
            "nan_policy": tuple(train.NAN_POLICIES)}


def plugin_modules(cfg: "Config") -> list[str]:
    """The modules outside rsst_jax that registered ``cfg``'s network or criterion (what
    a printed command must ``--import`` to run or read it again)."""
    from rsst_jax import criteria, nets
    found = [nets.registered_module(cfg.model.arch),
             criteria.registered_module(cfg.prune.criteria)]
    return list(dict.fromkeys(m for m in found
                              if m and m != "__main__" and m.split(".")[0] != "rsst_jax"))


def _checked_value(name: str, value: Any, allowed: Optional[tuple]) -> Any:
    """``value`` as the type of flag ``name`` (values from --config files arrive untyped);
    ConfigError when it cannot be one."""
    field = field_of(name)
    flag, kind = f"--{name}", str(field.type)
    if value is None and kind.startswith("Optional"):
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if "bool" in kind:
        ok, out, want = isinstance(value, bool), value, "true or false"
    elif "int" in kind:
        integral = number and (isinstance(value, int) or value.is_integer())
        ok, out, want = integral, int(value) if integral else value, "an integer"
    elif "float" in kind:
        ok, out, want = number, float(value) if number else value, "a number"
    else:  # str; YAML turns "91" into 91 and "91,136" may be written as a list
        if isinstance(value, (list, tuple)) and all(
                isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in value):
            value = ",".join(str(v) for v in value)
        ok, out, want = isinstance(value, str) or number, str(value), "a string"
    if not ok:
        raise ConfigError(f"{flag} must be {want}, got {value!r}")
    if allowed is not None and out not in allowed:
        if name in ("dataset", "arch", "criteria"):  # registries: users add their own
            how = {"arch": "; or register your own network with rsst_jax.nets.register_net in "
                           "a module and pass --import MODULE",
                   "criteria": "; or register your own with "
                               "rsst_jax.criteria.register_criterion in a module and pass "
                               "--import MODULE"}.get(name, "")
            raise ConfigError(f"unknown {flag} {out!r}; choose one of: {', '.join(allowed)}{how}")
        raise ConfigError(f"{flag} must be one of {', '.join(allowed)}, got {out!r}")
    return out


_FINITE = ("lr", "momentum", "weight_decay", "rate", "fillback_rate", "reg_granularity_prune",
           "exponents", "kd_alpha", "kd_temperature", "target_acc")


def validate(cfg: Config) -> Config:
    """Check every value and combination before any compute; raise ConfigError.

    Returns the config with values from a --config file converted to the field types.
    Pure: nothing here looks at the file system (see ``experiments.cli``).
    """
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    allowed = choices()
    flat = {name: _checked_value(name, value, allowed.get(name))
            for name, value in cfg.to_dict().items()}
    cfg = Config.from_dict(flat)
    m, o, p, s, r = cfg.model, cfg.optim, cfg.prune, cfg.rsst, cfg.run
    for name in _FINITE:
        value = flat[name]
        need(value is None or math.isfinite(value), f"--{name} must be a finite number, got {value}")
    need(r.seed is None or 0 <= r.seed < 2 ** 32, f"--seed must be in [0, 2**32), got {r.seed}")
    for name, value in flat.items():  # counts end up in int32 arrays
        need(name == "seed" or not isinstance(value, int) or abs(value) < 2 ** 31,
             f"--{name} {value} is out of range")
    need(p.pruning_times <= 1000, f"--pruning_times must be <= 1000, got {p.pruning_times}")
    need(r.save_dir.strip() != "", "--save_dir must name a directory")
    from rsst_jax import nets
    need(m.shortcut == "A" or "shortcut" in nets.net_options(m.arch),
         f"--shortcut applies to the CIFAR ResNets (res20s ... res110s), not to {m.arch}")
    need(0.0 <= p.rate < 1.0, f"--rate must be in [0, 1), got {p.rate}")
    need(0.0 <= p.fillback_rate <= 1.0, f"--fillback_rate must be in [0, 1], got {p.fillback_rate}")
    need(o.batch_size >= 1, f"--batch_size must be >= 1, got {o.batch_size}")
    need(o.eval_batch_size >= 1, f"--eval_batch_size must be >= 1, got {o.eval_batch_size}")
    need(o.bn_recalibrate >= 0, f"--bn_recalibrate must be >= 0 batches, got {o.bn_recalibrate}")
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
    need(not (p.struct != "none" and p.prune_method == "filter"),
         f"--struct {p.struct} with --prune_method filter makes no sense: filter pruning is "
         f"already channel-wise; use --struct none")
    need(p.criteria_batches >= 1, f"--criteria_batches must be >= 1, got {p.criteria_batches}")
    need(p.hessian_samples >= 1, f"--hessian_samples must be >= 1, got {p.hessian_samples}")
    need(s.reg_granularity_prune >= 0, "--reg_granularity_prune must be >= 0")
    need(s.reg_upper_limit is None or s.reg_upper_limit > 0, "--reg_upper_limit must be > 0")
    need(s.update_reg_interval is None or s.update_reg_interval >= 1,
         "--update_reg_interval must be >= 1 step")
    if s.reg_adaptive:
        need(s.target_acc is not None, "--reg_adaptive needs --target_acc (validation accuracy in %)")
    need(s.target_acc is None or 0 <= s.target_acc <= 100, "--target_acc is a percentage in [0, 100]")
    need(o.accum_steps >= 1, "--accum_steps must be >= 1")
    need(o.kd_temperature > 0, "--kd_temperature must be > 0")
    need(0 <= o.kd_alpha <= 1, "--kd_alpha must be in [0, 1]")
    need(s.exponents > 0, f"--exponents must be > 0, got {s.exponents}")
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
    need(p.fillback_rate == 0 or p.struct != "none",
         "--fillback_rate refills channels, which needs --struct refill or rsst")
    for flag, on in (("--block_loss_grad", s.block_loss_grad),
                     ("--reg_adaptive", s.reg_adaptive)):
        need(not on or p.struct == "rsst", f"{flag} acts on the RSST penalty; it needs "
             f"--struct rsst (got --struct {p.struct})")
    need(o.batch_size % o.accum_steps == 0, f"--batch_size {o.batch_size} must be a "
         f"multiple of --accum_steps {o.accum_steps} (the micro-batches are equal)")
    need(r.fused_steps is None or r.fused_steps >= 1, "--fused_steps must be >= 1")
    need(r.num_seeds >= 1, f"--num_seeds must be >= 1, got {r.num_seeds}")
    need(r.num_seeds == 1 or not o.distill, "--num_seeds > 1 with --distill is not "
         "supported; run the seeds separately")
    return cfg


__all__ = ["ConfigError", "Config", "DataConfig", "ModelConfig", "OptimConfig", "PruneConfig",
           "RSSTConfig", "RunConfig", "GROUPS", "FLAG_ORDER", "GROUP_OF", "field_of",
           "NON_SEMANTIC", "semantic_diffs", "parse_int_list", "parse_float_list",
           "parse_layer_rates", "choices", "validate", "plugin_modules"]
