"""Run configuration: one dataclass from which the command line is generated.

Flag names and defaults follow the PyTorch reference's ``main_imp_fillback.py``
(SPEC section 4); the flags it lacks are marked "new" in their help text.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
from typing import Any, Optional

STRUCTS = ("none", "refill", "rsst")
PRUNE_TYPES = ("lt", "pt", "rewind_lt")
PRUNE_SCOPES = ("global", "layerwise")
PRUNE_METHODS = ("magnitude", "random", "filter")
CRITERIA = ("remain", "magnitude", "l1", "l2", "saliency", "hessian")
SCHEDULES = ("x", "x^2", "x^3", "exp", "exp_custom", "exp_custom_exponents")
OPTIMIZERS = ("sgd", "adam", "adamw")
PRECISIONS = ("fp32", "bf16")


class ConfigError(ValueError):
    """A flag or config value that cannot work; the message says what to change."""


def _f(default, help, *, choices=None, flag_type=None, new=False):
    meta = {"help": ("(new) " if new else "") + help}
    if choices is not None:
        meta["choices"] = choices
    if flag_type is not None:
        meta["type"] = flag_type
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class Config:
    # --- data and model
    data: Optional[str] = _f(None, "data directory (default: the data set's usual place; "
                             "fashion_mnist: /usr/share/datasets/fashion-mnist, cifar: ./data)",
                             flag_type=str)
    dataset: str = _f("cifar100", "data set: digits (bundled, always works), fashion_mnist, "
                      "cifar10, cifar100, tiny-imagenet")
    arch: str = _f("res20s", "network (see rsst_jax.nets.available_nets())")
    shortcut: str = _f("A", "CIFAR ResNet shortcut: A (parameter-free) or B (1x1 conv + BN)",
                       choices=("A", "B"), new=True)
    seed: Optional[int] = _f(None, "random seed (None means 0)", flag_type=int)
    # --- run directory
    save_dir: str = _f("results", "directory for checkpoints, logs and summaries")
    resume: bool = _f(False, "continue the run in --save_dir from its newest checkpoint")
    checkpoint: Optional[str] = _f(None, "checkpoint directory to resume from "
                                   "(default: the newest one in --save_dir)", flag_type=str)
    init: Optional[str] = _f(None, "initialization W0: loaded if it exists, else written there "
                             "(default: SAVE_DIR/init)", flag_type=str)
    # --- optimization
    batch_size: int = _f(128, "training batch size")
    lr: float = _f(0.01, "initial learning rate")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(1e-4, "weight decay, coupled (added to the gradient as PyTorch SGD does)")
    epochs: int = _f(120, "epochs per round")
    warmup: int = _f(20, "linear per-step learning-rate warm-up, in epochs")
    print_freq: int = _f(50, "steps between progress-bar refreshes")
    decreasing_lr: str = _f("91,136", "epochs at which the learning rate is multiplied by 0.1")
    optimizer: str = _f("sgd", "optimizer (adam/adamw often suit fine-tuning with lr 0.001)",
                        choices=OPTIMIZERS, new=True)
    eval_batch_size: int = _f(500, "evaluation batch size", new=True)
    # --- pruning
    pruning_times: int = _f(20, "rounds of training; 1 is plain dense training")
    rate: float = _f(0.2, "fraction of the remaining prunable weights removed after each round")
    prune_type: str = _f("lt", "rewinding: lt (to W0), rewind_lt (to epoch --rewind_epoch of "
                         "round 0), pt (to --pretrained)", choices=PRUNE_TYPES)
    pretrained: Optional[str] = _f(None, "pretrained weights for --prune_type pt (orbax checkpoint)",
                                   flag_type=str)
    conv1: bool = _f(False, "also prune the stem convolution")
    fc: bool = _f(False, "also prune dense (classifier) kernels")
    prune_fc: bool = _f(False, "same as --fc", new=True)
    rewind_epoch: int = _f(24, "epoch of round 0 whose weights are the rewind point (rewind_lt)")
    prune_scope: str = _f("global", "rank weights over all layers or within each layer",
                          choices=PRUNE_SCOPES, new=True)
    prune_method: str = _f("magnitude", "magnitude (IMP), random (baseline) or filter "
                           "(structured L1 filter pruning)", choices=PRUNE_METHODS, new=True)
    rate_schedule: str = _f("", "comma-separated multipliers of --rate per prune step "
                            "(the last one repeats), e.g. 1,1,0.5", new=True)
    layer_rates: str = _f("", "per-layer multipliers of --rate, REGEX=MULT,... over parameter "
                          "paths, e.g. layer1=0.5,layer3=1.5 (implies layerwise ranking)", new=True)
    # --- structure (Refill / RSST)
    struct: str = _f("rsst", "none (IMP), refill or rsst", choices=STRUCTS)
    fillback_rate: float = _f(0.0, "Refill+: fraction of the pruned channels given back")
    criteria: str = _f("l1", "channel criterion: remain, magnitude, l1, l2, saliency, hessian, "
                       "or any name registered with rsst_jax.criteria.register_criterion")
    criteria_batches: int = _f(1, "training batches used for activation-based criteria", new=True)
    hessian_samples: int = _f(8, "Hutchinson probes for --criteria hessian", new=True)
    mask_bn: Optional[bool] = _f(None, "channel masks also zero and freeze the following "
                                 "BatchNorm (default: on for refill/rsst)", new=True)
    # --- RSST regularization
    block_loss_grad: bool = _f(False, "drop the loss gradient of penalized weights")
    RST_schedule: str = _f("exp_custom_exponents", "penalty schedule lambda(t)", choices=SCHEDULES)
    reg_granularity_prune: float = _f(1.0, "penalty scale g")
    exponents: float = _f(4.0, "exponent of exp_custom_exponents")
    reg_upper_limit: Optional[float] = _f(None, "cap on lambda", flag_type=float, new=True)
    update_reg_interval: Optional[int] = _f(None, "steps between penalty updates for the x, x^k "
                                            "and exp schedules (default: one epoch)",
                                            flag_type=int, new=True)
    reg_progress: str = _f("round", "progress p runs over the round, or restarts every epoch "
                           "as in the reference", choices=("round", "epoch"), new=True)
    reg_adaptive: bool = _f(False, "halve lambda while validation accuracy < --target_acc", new=True)
    target_acc: Optional[float] = _f(None, "target validation accuracy (%) for --reg_adaptive",
                                     flag_type=float, new=True)
    # --- extras
    distill: bool = _f(False, "distil from the dense round-0 network in later rounds", new=True)
    kd_alpha: float = _f(0.5, "weight of the distillation loss", new=True)
    kd_temperature: float = _f(4.0, "distillation temperature", new=True)
    accum_steps: int = _f(1, "gradient accumulation micro-batches per step", new=True)
    precision: str = _f("fp32", "compute precision: bf16 computes in bfloat16 with float32 "
                        "weights, optimizer state and BatchNorm statistics", choices=PRECISIONS,
                        new=True)
    fused: str = _f("auto", "run --fused_steps steps at a time as one compiled program "
                    "(lax.scan; on CPU unrolled, where XLA runs convolution gradients inside a "
                    "loop far slower): on, off, or auto (= on)", choices=("auto", "on", "off"),
                    new=True)
    fused_steps: Optional[int] = _f(None, "steps per fused chunk; the progress bar advances per "
                                    "chunk (default: --print_freq on GPU/TPU, 8 on CPU, where "
                                    "compile time grows with it)", flag_type=int, new=True)
    num_seeds: int = _f(1, "train this many tickets (seeds --seed, --seed+1, ...) together as "
                        "one vmapped program, each written to SAVE_DIR/seed_<s>/", new=True)
    nan_policy: str = _f("stop", "on a NaN/Inf loss: stop the round, or skip the batch",
                         choices=("stop", "skip"), new=True)
    config: Optional[str] = _f(None, "YAML or TOML file supplying any flag; command-line "
                               "flags override it", flag_type=str, new=True)
    dry_run: bool = _f(False, "check everything, print the plan and exit", new=True)

    # ---------------------------------------------------------------- derived
    @property
    def milestones(self) -> tuple[int, ...]:
        return parse_int_list(self.decreasing_lr, "--decreasing_lr")

    @property
    def prune_dense(self) -> bool:
        return self.fc or self.prune_fc

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
    def resolved_seed(self) -> int:
        return 0 if self.seed is None else self.seed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> "Config":
        return dataclasses.replace(self, **kw)


# Fields that do not change what a run computes, so a resumed run may differ in them.
NON_SEMANTIC = ("resume", "checkpoint", "print_freq", "dry_run", "config", "save_dir", "data",
                "eval_batch_size", "fused", "fused_steps")  # fused: equal results, tested


def semantic_diffs(saved: dict, now: dict, limit: int = 5) -> str:
    """'--k saved (now new), ...' for the semantic fields where ``now`` differs from the
    ``saved`` config dict (fields ``saved`` lacks are skipped); '' when they agree."""
    diffs = [k for k, v in now.items() if k not in NON_SEMANTIC and k in saved and saved[k] != v]
    return ", ".join(f"--{k} {saved[k]!r} (now {now[k]!r})" for k in diffs[:limit])


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


def _bool_flag(parser, name, default, help):
    if default is None or default is True:
        parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default,
                            help=help)
    else:
        parser.add_argument(f"--{name}", action="store_true", default=False, help=help)


def build_parser(prog: str = "python -m experiments.run") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Find structurally sparse lottery tickets: IMP, Refill and RSST rounds. "
                    "Quick start: --dataset digits.",
        epilog="Environment: RSST_JAX_CACHE=DIR|off keeps compiled programs (default "
               "~/.cache/rsst_jax/jax); RSST_JAX_CPU_DEVICES=N splits the host CPU into N "
               "devices and trains data parallel over them (CPU only, opt-in). Exit codes: "
               "0 done, 2 bad input, 3 training diverged. Details: README.md and docs/.")
    for field in dataclasses.fields(Config):
        meta = dict(field.metadata)
        help_text = meta.pop("help").replace("%", "%%")  # argparse formats help with %
        if field.type in ("bool", "Optional[bool]"):
            _bool_flag(parser, field.name, field.default, help_text)
            continue
        flag_type = meta.pop("type", None) or type(field.default)
        parser.add_argument(f"--{field.name}", type=flag_type, default=field.default,
                            help=help_text, **meta)
    return parser


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML or TOML file of flag values; unknown keys are an error."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            values = tomllib.loads(text)
        elif p.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml
            values = yaml.safe_load(text) or {}
    except Exception as e:  # parser errors differ per format; the message names the file
        raise ConfigError(f"--config {path}: cannot parse it ({e.__class__.__name__}: {e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown keys {', '.join(unknown)} "
                          f"(see python -m experiments.run --help)")
    return values


def parse_args(argv=None) -> Config:
    """Command line (and --config file) -> Config. Command-line flags override the file."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = vars(args)
    if args.config:
        file_values = load_config_file(args.config)
        # The flags given on the command line, even those equal to their default.
        probe = build_parser()
        for action in probe._actions:
            action.default = argparse.SUPPRESS
        explicit = set(vars(probe.parse_args(argv)))
        for key, value in file_values.items():
            if key not in explicit:
                values[key] = value
    cfg = Config(**values)
    return cfg


def _checked_value(field: dataclasses.Field, value: Any) -> Any:
    """``value`` as the type of ``field`` (values from --config files arrive untyped);
    ConfigError when it cannot be one."""
    flag, kind = f"--{field.name}", str(field.type)
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
    choices = field.metadata.get("choices")
    if choices is not None and out not in choices:
        raise ConfigError(f"{flag} must be one of {', '.join(choices)}, got {out!r}")
    return out


_FINITE = ("lr", "momentum", "weight_decay", "rate", "fillback_rate", "reg_granularity_prune",
           "exponents", "kd_alpha", "kd_temperature", "target_acc")


def validate(cfg: Config) -> Config:
    """Check every value and combination before any compute; raise ConfigError.

    Returns the config with values from a --config file converted to the field types.
    """
    from rsst_jax import data as data_lib
    from rsst_jax import nets

    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    cfg = dataclasses.replace(cfg, **{f.name: _checked_value(f, getattr(cfg, f.name))
                                      for f in dataclasses.fields(Config)})
    for name in _FINITE:
        value = getattr(cfg, name)
        need(value is None or math.isfinite(value), f"--{name} must be a finite number, got {value}")
    need(cfg.seed is None or 0 <= cfg.seed < 2 ** 32, f"--seed must be in [0, 2**32), got {cfg.seed}")
    for f in dataclasses.fields(Config):  # counts end up in int32 arrays
        value = getattr(cfg, f.name)
        need(f.name == "seed" or not isinstance(value, int) or abs(value) < 2 ** 31,
             f"--{f.name} {value} is out of range")
    need(cfg.pruning_times <= 1000, f"--pruning_times must be <= 1000, got {cfg.pruning_times}")
    need(cfg.save_dir.strip() != "", "--save_dir must name a directory")
    need(cfg.dataset in data_lib.DATASETS,
         f"unknown --dataset {cfg.dataset!r}; choose one of: {', '.join(data_lib.DATASETS)}")
    from rsst_jax import criteria as criteria_lib
    need(cfg.criteria in criteria_lib.available_criteria(),
         f"unknown --criteria {cfg.criteria!r}; choose one of: "
         f"{', '.join(criteria_lib.available_criteria())}")
    need(cfg.arch in nets.available_nets(),
         f"unknown --arch {cfg.arch!r}; choose one of: {', '.join(nets.available_nets())}")
    need(cfg.shortcut == "A" or "shortcut" in nets.net_options(cfg.arch),
         f"--shortcut applies to the CIFAR ResNets (res20s ... res110s), not to {cfg.arch}")
    need(0.0 <= cfg.rate < 1.0, f"--rate must be in [0, 1), got {cfg.rate}")
    need(0.0 <= cfg.fillback_rate <= 1.0, f"--fillback_rate must be in [0, 1], got {cfg.fillback_rate}")
    need(cfg.batch_size >= 1, f"--batch_size must be >= 1, got {cfg.batch_size}")
    need(cfg.eval_batch_size >= 1, f"--eval_batch_size must be >= 1, got {cfg.eval_batch_size}")
    need(cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}")
    need(cfg.warmup >= 0, f"--warmup must be >= 0, got {cfg.warmup}")
    need(cfg.pruning_times >= 1, f"--pruning_times must be >= 1 (1 = dense training only), "
         f"got {cfg.pruning_times}")
    need(cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr must be a positive number, got {cfg.lr}")
    need(0.0 <= cfg.momentum < 1.0, f"--momentum must be in [0, 1), got {cfg.momentum}")
    need(cfg.weight_decay >= 0, f"--weight_decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.print_freq >= 1, f"--print_freq must be >= 1, got {cfg.print_freq}")
    milestones = cfg.milestones
    need(all(m > 0 for m in milestones), f"--decreasing_lr epochs must be positive: {cfg.decreasing_lr}")
    mults = cfg.rate_multipliers
    need(all(0 <= cfg.rate * m < 1 for m in mults),
         f"--rate_schedule multipliers times --rate must stay in [0, 1): {cfg.rate_schedule}")
    cfg.layer_rate_map  # parses or raises
    if cfg.prune_type == "rewind_lt":
        need(0 <= cfg.rewind_epoch < cfg.epochs,
             f"--rewind_epoch {cfg.rewind_epoch} must be below --epochs {cfg.epochs} "
             f"for --prune_type rewind_lt")
    if cfg.prune_type == "pt":
        need(cfg.pretrained is not None, "--prune_type pt needs --pretrained CHECKPOINT")
        need(os.path.exists(cfg.pretrained), f"--pretrained {cfg.pretrained}: no such file or directory")
    need(not (cfg.struct != "none" and cfg.prune_method == "filter"),
         f"--struct {cfg.struct} with --prune_method filter makes no sense: filter pruning is "
         f"already channel-wise; use --struct none")
    need(cfg.criteria_batches >= 1, f"--criteria_batches must be >= 1, got {cfg.criteria_batches}")
    need(cfg.hessian_samples >= 1, f"--hessian_samples must be >= 1, got {cfg.hessian_samples}")
    need(cfg.reg_granularity_prune >= 0, "--reg_granularity_prune must be >= 0")
    need(cfg.reg_upper_limit is None or cfg.reg_upper_limit > 0, "--reg_upper_limit must be > 0")
    need(cfg.update_reg_interval is None or cfg.update_reg_interval >= 1,
         "--update_reg_interval must be >= 1 step")
    if cfg.reg_adaptive:
        need(cfg.target_acc is not None, "--reg_adaptive needs --target_acc (validation accuracy in %)")
    need(cfg.target_acc is None or 0 <= cfg.target_acc <= 100, "--target_acc is a percentage in [0, 100]")
    need(cfg.accum_steps >= 1, "--accum_steps must be >= 1")
    need(cfg.kd_temperature > 0, "--kd_temperature must be > 0")
    need(0 <= cfg.kd_alpha <= 1, "--kd_alpha must be in [0, 1]")
    need(cfg.exponents > 0, f"--exponents must be > 0, got {cfg.exponents}")
    need(cfg.warmup <= cfg.epochs,
         f"--warmup {cfg.warmup} is longer than --epochs {cfg.epochs}: the learning rate would "
         f"never reach --lr; pass a --warmup of at most {cfg.epochs} (e.g. --warmup 0)")
    if cfg.layer_rate_map:
        need(cfg.prune_method == "magnitude",
             f"--layer_rates applies to --prune_method magnitude, not {cfg.prune_method}")
        top = cfg.rate * max(mults)
        for pattern, mult in cfg.layer_rate_map.items():
            need(mult >= 0 and top * mult < 1,
                 f"--layer_rates {pattern}={mult}: --rate {cfg.rate} times it must stay in [0, 1) "
                 f"(1 or more would remove every remaining weight of those layers)")
    need(cfg.pretrained is None or cfg.prune_type == "pt",
         "--pretrained is only used with --prune_type pt; add --prune_type pt or leave it out")
    need(cfg.checkpoint is None or cfg.resume,
         "--checkpoint names where to resume from; add --resume or leave it out")
    need(cfg.checkpoint is None or os.path.isdir(cfg.checkpoint),
         f"--checkpoint {cfg.checkpoint}: no such directory")
    need(cfg.init is None or not os.path.exists(cfg.init) or os.path.isdir(cfg.init),
         f"--init {cfg.init} is a file; it must be a checkpoint directory (or a new path)")
    need(cfg.fillback_rate == 0 or cfg.struct != "none",
         "--fillback_rate refills channels, which needs --struct refill or rsst")
    for flag, on in (("--block_loss_grad", cfg.block_loss_grad),
                     ("--reg_adaptive", cfg.reg_adaptive)):
        need(not on or cfg.struct == "rsst", f"{flag} acts on the RSST penalty; it needs "
             f"--struct rsst (got --struct {cfg.struct})")
    need(cfg.batch_size % cfg.accum_steps == 0, f"--batch_size {cfg.batch_size} must be a "
         f"multiple of --accum_steps {cfg.accum_steps} (the micro-batches are equal)")
    need(cfg.fused_steps is None or cfg.fused_steps >= 1, "--fused_steps must be >= 1")
    need(cfg.num_seeds >= 1, f"--num_seeds must be >= 1, got {cfg.num_seeds}")
    need(cfg.num_seeds == 1 or not cfg.distill, "--num_seeds > 1 with --distill is not "
         "supported; run the seeds separately")
    return cfg


def check_save_dir(path: str) -> None:
    """Fail early when the run directory cannot be written."""
    p = pathlib.Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--save_dir {path} is not writable ({e.strerror}); "
                          f"choose another directory with --save_dir") from None


def flags_markdown() -> str:
    """The flag table of README.md (a test keeps the two in step)."""
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    for field in dataclasses.fields(Config):
        text = field.metadata["help"].replace("|", "\\|")
        if field.metadata.get("choices"):
            text += " (" + ", ".join(field.metadata["choices"]) + ")"
        lines.append(f"| `--{field.name}` | `{field.default}` | {text} |")
    return "\n".join(lines)
