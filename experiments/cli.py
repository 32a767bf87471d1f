"""The command line shared by every ``python -m experiments.<command>``.

- ``run_parser()``: the flags of ``experiments.run`` (the PyTorch reference's names and
  defaults, generated from ``rsst_jax.config``), with the help texts below;
- ``parse_run_args(argv)``: command line (and ``--config FILE``) -> ``Config``, every
  error one line (``ConfigError``);
- ``check_paths(cfg)``: the checks that look at the file system;
- ``flags_markdown()``: the README's flag table.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
from typing import Any, Optional, Sequence

from rsst_jax import config as config_lib
from rsst_jax.config import ConfigError

# flag -> help text; "(new)" marks flags the reference does not have.
HELP = {
    "data": "data directory (default: the data set's usual place; fashion_mnist: "
            "/usr/share/datasets/fashion-mnist, cifar: ./data)",
    "dataset": "data set: digits (bundled, always works), fashion_mnist, cifar10, cifar100, "
               "tiny-imagenet",
    "arch": "network (see rsst_jax.nets.available_nets())",
    "shortcut": "(new) CIFAR ResNet shortcut: A (parameter-free) or B (1x1 conv + BN)",
    "seed": "random seed (None means 0)",
    "save_dir": "directory for checkpoints, logs and summaries",
    "resume": "continue the run in --save_dir from its newest checkpoint",
    "checkpoint": "checkpoint directory to resume from (default: the newest one in --save_dir)",
    "init": "initialization W0: loaded if it exists, else written there (default: SAVE_DIR/init)",
    "batch_size": "training batch size",
    "lr": "initial learning rate",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay, coupled (added to the gradient as PyTorch SGD does)",
    "epochs": "epochs per round",
    "warmup": "linear per-step learning-rate warm-up, in epochs",
    "print_freq": "steps between progress-bar refreshes",
    "decreasing_lr": "epochs at which the learning rate is multiplied by 0.1",
    "optimizer": "(new) optimizer (adam/adamw often suit fine-tuning with lr 0.001)",
    "eval_batch_size": "(new) evaluation batch size",
    "pruning_times": "rounds of training; 1 is plain dense training",
    "rate": "fraction of the remaining prunable weights removed after each round",
    "prune_type": "rewinding: lt (to W0), rewind_lt (to epoch --rewind_epoch of round 0), pt (to "
                  "--pretrained)",
    "pretrained": "pretrained weights for --prune_type pt (rsst-jax checkpoint, PyTorch "
                  "state_dict or .npz); the classifier and the stem convolution stay freshly "
                  "initialized, as in the reference",
    "conv1": "also prune the stem convolution",
    "fc": "accepted as in the reference, where it rewinds the classifier; every layer is "
          "rewound here, so it changes nothing (prune dense kernels with --prune_fc)",
    "prune_fc": "(new) also prune dense (classifier) kernels",
    "rewind_epoch": "epoch of round 0 whose weights are the rewind point (rewind_lt)",
    "prune_scope": "(new) rank weights over all layers or within each layer",
    "prune_method": "(new) magnitude (IMP), random (baseline) or filter (structured L1 filter "
                    "pruning)",
    "rate_schedule": "(new) comma-separated multipliers of --rate per prune step (the last one "
                     "repeats), e.g. 1,1,0.5",
    "layer_rates": "(new) per-layer multipliers of --rate, REGEX=MULT,... over parameter paths, "
                   "e.g. layer1=0.5,layer3=1.5 (implies layerwise ranking)",
    "struct": "none (IMP), refill or rsst",
    "fillback_rate": "Refill+: fraction of the pruned channels given back",
    "criteria": "channel criterion: remain, magnitude, l1, l2, saliency, hessian, or any name "
                "registered with rsst_jax.criteria.register_criterion",
    "criteria_batches": "(new) training batches used for activation-based criteria",
    "hessian_samples": "(new) Hutchinson probes for --criteria hessian",
    "mask_bn": "(new) channel masks also zero and freeze the following BatchNorm (default: on "
               "for refill/rsst)",
    "score_after_prune": "(new) score channels on the weights left after the round's magnitude "
                         "prune, not on the trained weights as the reference does (how "
                         "rsst-jax 0.1 scored)",
    "block_loss_grad": "drop the loss gradient of penalized weights",
    "RST_schedule": "penalty schedule lambda(t)",
    "reg_granularity_prune": "penalty scale g",
    "exponents": "exponent of exp_custom_exponents",
    "reg_upper_limit": "(new) cap on lambda",
    "update_reg_interval": "(new) steps between penalty updates for the x, x^k and exp "
                           "schedules (one epoch when not given)",
    "reg_progress": "(new) progress p runs over the round, or restarts every epoch as in the "
                    "reference",
    "reg_adaptive": "(new) halve lambda while validation accuracy < --target_acc",
    "target_acc": "(new) target validation accuracy (%) for --reg_adaptive",
    "distill": "(new) distil from the dense round-0 network in later rounds",
    "kd_alpha": "(new) weight of the distillation loss",
    "kd_temperature": "(new) distillation temperature",
    "accum_steps": "(new) gradient accumulation micro-batches per step",
    "precision": "(new) compute precision: bf16 computes in bfloat16 with float32 weights, "
                 "optimizer state and BatchNorm statistics",
    "fused": "(new) run --fused_steps steps at a time as one compiled program (on CPU "
             "unrolled, where XLA runs convolution gradients inside a loop far slower): on, "
             "off, or auto (on where it is faster, see docs/performance.md)",
    "fused_steps": "(new) steps per fused chunk; the progress bar advances per chunk (when not "
                   "given: --print_freq on GPU/TPU, 8 on CPU, where compile time grows with it)",
    "num_seeds": "(new) train this many tickets (seeds --seed, --seed+1, ...) together as one "
                 "vmapped program, each written to SAVE_DIR/seed_<s>/",
    "nan_policy": "(new) on a NaN/Inf loss: stop the round, or skip the batch",
    "config": "(new) YAML or TOML file supplying any flag; command-line flags override it",
    "dry_run": "(new) check everything, print the plan and exit",
}
assert set(HELP) == set(config_lib.FLAG_ORDER)

EPILOG = ("Environment: RSST_JAX_CACHE=DIR|off keeps compiled programs (by default in "
          "~/.cache/rsst_jax/jax); RSST_JAX_CPU_DEVICES=N splits the host CPU into N devices "
          "and trains data parallel over them (CPU only, opt-in). Exit codes: 0 done, 2 bad "
          "input, 3 training diverged, 130 interrupted (Ctrl-C). Details: README.md and docs/.")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once: not where the help text already says what it is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or "when not given" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _bool_flag(parser, name, default, help_text):
    if default is None or default is True:
        parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default,
                            help=help_text)
    else:
        parser.add_argument(f"--{name}", action="store_true", default=False, help=help_text)


def run_parser(prog: str = "python -m experiments.run") -> argparse.ArgumentParser:
    """The parser of ``experiments.run``: one flag per configuration field."""
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=HelpFormatter, epilog=EPILOG,
        description="Find structurally sparse lottery tickets: IMP, Refill and RSST rounds. "
                    "Quick start: --dataset digits.")
    allowed = config_lib.choices()
    for name in config_lib.FLAG_ORDER:
        field = config_lib.field_of(name)
        help_text = HELP[name].replace("%", "%%")  # argparse formats help with %
        kind = str(field.type)
        if "bool" in kind:
            _bool_flag(parser, name, field.default, help_text)
            continue
        flag_type = (int if "int" in kind else float if "float" in kind else str)
        extra = {"choices": allowed[name]} if name in allowed and name not in (
            "criteria", "arch", "dataset") else {}
        parser.add_argument(f"--{name}", type=flag_type, default=field.default, help=help_text,
                            **extra)
    return parser


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML, TOML or JSON file of flag values; unknown keys are an error."""
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
    unknown = sorted(set(values) - set(config_lib.FLAG_ORDER))
    if unknown:
        raise ConfigError(f"--config {path}: unknown keys {', '.join(unknown)} "
                          f"(see python -m experiments.run --help)")
    return values


def explicit_flags(argv: Optional[Sequence[str]], prog: str = "python -m experiments.run"
                   ) -> set[str]:
    """The flags given on the command line ``argv``, even those equal to their default."""
    probe = run_parser(prog)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(one_line_parse(probe, argv, prog)))


def parse_run_args(argv: Optional[Sequence[str]] = None,
                   prog: str = "python -m experiments.run") -> config_lib.Config:
    """Command line (and --config file) -> validated Config; command-line flags override
    the file. Every error is one ConfigError line; ``--help`` exits 0 (SystemExit)."""
    parser = run_parser(prog)
    values = vars(one_line_parse(parser, argv, prog))
    if values.get("config"):
        file_values = load_config_file(values["config"])
        explicit = explicit_flags(argv, prog)
        for key, value in file_values.items():
            if key not in explicit:
                values[key] = value
    return config_lib.validate(config_lib.Config.from_dict(values))


def one_line_parse(parser: argparse.ArgumentParser, argv, prog: str) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with argparse's usage text and error folded into one
    ConfigError line (argparse prints two or more lines and exits 2 by itself)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit as e:
        if not e.code:  # --help
            raise
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        text = lines[-1].split(": error: ", 1)[-1] if lines else "bad command line"
        raise ConfigError(f"{text} (see {prog} --help)") from None


def check_paths(cfg: config_lib.Config) -> None:
    """The checks that look at the file system, before any compute: the input files
    exist and --save_dir can be written (nothing is created here)."""
    p, r = cfg.prune, cfg.run
    if p.pretrained is not None and not os.path.exists(p.pretrained):
        raise ConfigError(f"--pretrained {p.pretrained}: no such file or directory")
    if r.checkpoint is not None and not os.path.isdir(r.checkpoint):
        raise ConfigError(f"--checkpoint {r.checkpoint}: no such directory")
    if r.init is not None and os.path.exists(r.init) and not os.path.isdir(r.init):
        raise ConfigError(f"--init {r.init} is a file; it must be a checkpoint directory "
                          f"(or a new path)")
    check_save_dir(r.save_dir)


def check_save_dir(path: str) -> None:
    """Fail early when the run directory cannot be written; creates nothing."""
    p = pathlib.Path(path).absolute()
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--save_dir {path} is not writable ({existing} is a file); choose "
                          f"another directory with --save_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--save_dir {path} is not writable ({existing}: permission denied); "
                          f"choose another directory with --save_dir")


def flags_markdown() -> str:
    """The flag table of README.md (a test keeps the two in step)."""
    allowed = config_lib.choices()
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    for name in config_lib.FLAG_ORDER:
        text = HELP[name].replace("|", "\\|")
        if name in allowed and name not in ("criteria", "arch", "dataset"):
            text += " (" + ", ".join(allowed[name]) + ")"
        lines.append(f"| `--{name}` | `{config_lib.field_of(name).default}` | {text} |")
    return "\n".join(lines)


__all__ = ["HELP", "run_parser", "parse_run_args", "one_line_parse", "load_config_file",
           "explicit_flags", "check_paths", "check_save_dir", "flags_markdown",
           "HelpFormatter"]
