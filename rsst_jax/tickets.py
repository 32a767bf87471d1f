"""Open a ticket: one checkpoint of a run, with the network that reads it.

``load(path)`` is how rsst-jax opens a checkpoint (``experiments.analyze``,
``experiments.compact``, ``experiments.plot``, ``--pretrained`` with an rsst-jax
checkpoint, and library users). ``path`` may be

- a run directory (``--save_dir``): its last round's final ticket (``round_idx`` and
  ``kind='best'`` choose another; a run without a finished round gives its ``init``);
- a ``round_<r>`` folder, a checkpoint folder (``round_<r>/final``, ``round_<r>/best``,
  ``init``, ``checkpoints``) or one numbered step folder inside one.

It returns a :class:`Ticket`: the arrays as numpy (params, BatchNorm statistics, the
kernel masks, and RSST's channel masks where a resume checkpoint holds them), the
checkpoint's metadata and the network (:class:`NetworkSpec`: arch, data set, classes, image
shape, network options), with the Flax model checked against the arrays. The network
comes from the checkpoint's metadata (what runs record), else from a final checkpoint
of the same run (best-validation checkpoints record none), else from the run's
``config.json``; arguments of ``load`` win over all of them. A checkpoint whose metadata
predates the image shape falls back to its data set's ``rsst_jax.data.IMAGE_SHAPES``.

Finding checkpoints needs no JAX; reading them does. Errors are one line naming the
path: :class:`TicketError` (no checkpoint of this layout there, a network that does not
fit) and ``rsst_jax.checkpoint.CheckpointError`` (a checkpoint whose files are damaged).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Optional, Sequence

import jax
import numpy as np

from rsst_jax import checkpoint as ckpt
from rsst_jax import config as config_lib
from rsst_jax import data as data_lib
from rsst_jax import engine, nets
from rsst_jax import masks as masks_lib
from rsst_jax import paths as paths_lib

KINDS = (paths_lib.FINAL, paths_lib.BEST)


class TicketError(paths_lib.RunDirError):
    """A path that holds no usable ticket, or a network that does not fit its arrays."""


# --------------------------------------------------------------------------- finding


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint step: ``directory/step`` written by ``rsst_jax.checkpoint.save``.

    ``kind`` is 'final', 'best', 'init', 'resume' or 'checkpoint' (a folder elsewhere);
    ``round`` is None where the path does not say it.
    """
    directory: pathlib.Path
    step: int
    kind: str
    round: Optional[int] = None

    @property
    def path(self) -> pathlib.Path:
        return self.directory / str(self.step)

    @property
    def run_dir(self) -> Optional[pathlib.Path]:
        """The run directory this checkpoint lies in, if any."""
        for parent in (self.directory.parent, self.directory.parent.parent):
            if paths_lib.is_run_dir(parent):
                return parent
        return None


def _step_dirs(directory: pathlib.Path) -> list[pathlib.Path]:
    if not directory.is_dir():
        return []
    return sorted((c for c in directory.iterdir() if c.is_dir() and c.name.isdigit()),
                  key=lambda c: int(c.name))


def _is_step_dir(p: pathlib.Path) -> bool:
    return p.is_dir() and p.name.isdigit() and (p / "state").is_dir()


def _older_layout(p: pathlib.Path) -> TicketError:
    return TicketError(f"{p} is a checkpoint from an older or foreign layout (no meta/ next to "
                       f"state/); this rsst-jax reads checkpoints written by "
                       f"python -m experiments.run (layout version 1)")


def _ref(directory: pathlib.Path, step: Optional[int] = None) -> CheckpointRef:
    steps = _step_dirs(directory)
    committed = [int(s.name) for s in steps if (s / "meta").is_dir() and (s / "state").is_dir()]
    if not committed:
        if steps:
            raise _older_layout(steps[-1])
        raise TicketError(f"{directory} holds no checkpoint (no numbered step folder)")
    if step is None:
        step = committed[-1]
    elif step not in committed:
        raise TicketError(f"{directory} has no step {step}; it has {committed}")
    kind, round_idx = "checkpoint", paths_lib.round_of(directory.parent.name)
    if round_idx is not None and directory.name in KINDS:
        kind = directory.name
    else:
        round_idx = None
        kind = {paths_lib.INIT: "init", paths_lib.CHECKPOINTS: "resume"}.get(directory.name, kind)
    return CheckpointRef(directory=directory, step=step, kind=kind, round=round_idx)


def list_checkpoints(run_dir) -> list[CheckpointRef]:
    """The round checkpoints of a run (``round_<r>/final`` and ``/best``, newest step
    each), by round, final before best."""
    run = paths_lib.RunPaths.of(run_dir)
    refs = []
    for r in run.rounds():
        for directory in (run.final(r), run.best(r)):
            if _step_dirs(directory):
                refs.append(_ref(directory))
    return refs


def _existing_dir(path) -> pathlib.Path:
    p = pathlib.Path(path)
    if not p.exists():
        raise TicketError(f"{p}: no such directory")
    if not p.is_dir():
        raise TicketError(f"{p} is a file; expected a run directory or an orbax checkpoint "
                          f"directory")
    return p


def resolve(path, *, round_idx: Optional[int] = None, kind: str = paths_lib.FINAL
            ) -> CheckpointRef:
    """The checkpoint ``path`` names (see the module docstring); ``round_idx`` and
    ``kind`` ('final' or 'best') pick one of a run directory's rounds."""
    if kind not in KINDS:
        raise TicketError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    p = _existing_dir(path)
    if _is_step_dir(p):
        if not (p / "meta").is_dir():
            raise _older_layout(p)
        return _ref(p.parent, int(p.name))
    if _step_dirs(p):
        return _ref(p)
    if paths_lib.round_of(p.name) is not None:
        if not (p / kind).is_dir():
            raise TicketError(f"{p} has no {kind}/ checkpoint (the round has not finished?)")
        return _ref(p / kind)
    run = paths_lib.RunPaths.of(p)
    if paths_lib.is_run_dir(p) or run.rounds():
        refs = [r for r in list_checkpoints(p) if r.kind == kind]
        if round_idx is not None:
            refs = [r for r in refs if r.round == round_idx]
            if not refs:
                raise TicketError(f"{p} has no {kind} checkpoint of round {round_idx}")
        if refs:
            return refs[-1]
        if _step_dirs(run.init()):
            return _ref(run.init())
        raise TicketError(f"{p} is a run directory without checkpoints yet")
    if any(c.suffix in (".msgpack", ".pt", ".pth", ".pkl") for c in p.iterdir() if c.is_file()):
        raise _older_layout(p)
    raise TicketError(f"{p} is neither an rsst-jax run directory nor an orbax checkpoint "
                      f"(expected --save_dir, round_<r>/final or a numbered step folder)")


# --------------------------------------------------------------------------- reading


def _as_ref(path_or_ref) -> CheckpointRef:
    return path_or_ref if isinstance(path_or_ref, CheckpointRef) else resolve(path_or_ref)


def _like_params(params: dict, masks) -> Any:
    """``masks`` as a tree of ``params``' structure: a bool array per masked leaf, None
    elsewhere (a checkpoint stores no None leaves)."""
    flat = {} if masks is None else masks_lib.flat_dict(masks)
    return jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(params),
        [None if flat.get(p) is None else np.asarray(flat[p], bool)
         for p in masks_lib.tree_paths(params)])


def read(path_or_ref) -> tuple[dict, dict, CheckpointRef]:
    """(arrays, meta, ref) of a checkpoint, without a network. ``arrays`` holds numpy
    ``params``, ``batch_stats``, ``masks`` and ``channel_masks`` (None where the
    checkpoint has none), masks shaped like ``params``; a resume checkpoint's training
    state is read the same way. Checks the layout version before reading any array."""
    ref = _as_ref(path_or_ref)
    meta = ckpt.read_meta(ref.directory, ref.step)
    if meta.get("layout_version") != ckpt.LAYOUT_VERSION:
        raise TicketError(f"{ref.path} has checkpoint layout version "
                          f"{meta.get('layout_version')}, this rsst-jax reads version "
                          f"{ckpt.LAYOUT_VERSION}: it comes from an older or newer layout; "
                          f"re-run it or open it with that version")
    tree, _ = ckpt.restore_raw(ref.directory, ref.step)
    if not isinstance(tree, dict):
        raise TicketError(f"{ref.path} does not hold a dictionary of arrays")
    channel = None
    if "params" not in tree and isinstance(tree.get("state"), dict):  # a resume checkpoint
        state = tree["state"]
        if meta.get("has_channel_masks"):
            channel = tree.get("channel_masks")
        tree = {"params": state.get("params"), "batch_stats": state.get("batch_stats"),
                "masks": tree.get("masks")}
    params = tree.get("params")
    if not isinstance(params, dict) or not params:
        raise TicketError(f"{ref.path} has no 'params': not a network checkpoint of this layout")
    arrays = {"params": params, "batch_stats": tree.get("batch_stats") or {},
              "masks": None if tree.get("masks") is None else _like_params(params, tree["masks"]),
              "channel_masks": None if channel is None else _like_params(params, channel)}
    return arrays, meta, ref


# --------------------------------------------------------------------------- the network


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """What builds the model of a checkpoint; ``sources`` says where each value came from
    ('checkpoint', 'final checkpoint', 'config.json', 'arrays', 'data set' or the
    argument's flag name)."""
    arch: Optional[str]
    dataset: Optional[str]
    num_classes: Optional[int]
    image_shape: Optional[tuple]
    options: dict
    sources: dict

    @property
    def complete(self) -> bool:
        return bool(self.arch and self.num_classes and self.image_shape)

    def missing(self) -> list[str]:
        """What is unknown of what builds the model: 'arch' and/or 'image_shape'."""
        return [name for name in ("arch", "image_shape") if not getattr(self, name)]


def run_config(ref: CheckpointRef) -> dict:
    """The ``config.json`` of the run ``ref`` lies in ({} if none or unreadable)."""
    run_dir = ref.run_dir
    if run_dir is None or not paths_lib.RunPaths.of(run_dir).config.is_file():
        return {}
    try:
        config = json.loads(paths_lib.RunPaths.of(run_dir).config.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def _final_meta(ref: CheckpointRef) -> dict:
    """The metadata of a final checkpoint of the same run (the round's own first)."""
    if ref.run_dir is None:
        return {}
    finals = [r for r in list_checkpoints(ref.run_dir) if r.kind == paths_lib.FINAL]
    finals.sort(key=lambda r: (r.round != ref.round, -(r.round or 0)))
    for other in finals:
        try:
            return ckpt.read_meta(other.directory, other.step)
        except ckpt.CheckpointError:
            continue
    return {}


def _config_options(arch: Optional[str], config: dict) -> Optional[dict]:
    """Network options from a run's config.json (``--shortcut``), None when it says none."""
    if not arch or "shortcut" not in config:
        return None
    if arch not in nets.available_nets():
        return None
    return engine.model_options(config_lib.ModelConfig(arch=arch, shortcut=config["shortcut"]))


def _arrays_options(arch: Optional[str], params: dict) -> dict:
    """Network options read off the arrays: a ResNet with shortcut convolutions is 'B'."""
    if not arch or arch not in nets.available_nets() or "shortcut" not in nets.net_options(arch):
        return {}
    return {"shortcut": "B"} if any("shortcut_conv" in p for p in masks_lib.flat_dict(params)) else {}


def describe(ref: CheckpointRef, meta: dict, params: dict, *, arch: Optional[str] = None,
             dataset: Optional[str] = None, image_shape: Optional[Sequence[int]] = None,
             options: Optional[dict] = None) -> NetworkSpec:
    """The network of a checkpoint (see the module docstring for the order of sources)."""
    config = run_config(ref)
    beside = {} if "arch" in meta else _final_meta(ref)
    sources = {}

    def pick(name, given, flag, *more):
        for source, value in ((flag, given), ("checkpoint", meta.get(name)),
                              ("final checkpoint", beside.get(name)), *more):
            if value is not None:
                sources[name] = source
                return value
        return None

    arch = pick("arch", arch, "--arch", (paths_lib.CONFIG, config.get("arch")))
    dataset = pick("dataset", dataset, "--dataset", (paths_lib.CONFIG, config.get("dataset")))
    dense = [v for p, v in masks_lib.flat_dict(params).items()
             if p.endswith("kernel") and np.ndim(v) == 2]
    num_classes = pick("num_classes", None, "", (
        "arrays", int(np.shape(dense[-1])[-1]) if dense else None))
    known = data_lib.IMAGE_SHAPES.get(dataset)
    shape = pick("image_shape", None if image_shape is None else tuple(image_shape),
                 "--input_shape", ("data set", known))
    opts = pick("model_options", options, "options", (paths_lib.CONFIG, _config_options(arch, config)),
                ("arrays", _arrays_options(arch, params)))
    return NetworkSpec(arch=arch, dataset=dataset,
                   num_classes=None if num_classes is None else int(num_classes),
                   image_shape=None if shape is None else tuple(int(x) for x in shape),
                   options=dict(opts or {}), sources=sources)


def model_of(network: NetworkSpec, variables: dict, where: Any):
    """The registered network of ``network``, checked against the arrays' shapes."""
    if network.arch not in nets.available_nets():
        raise TicketError(f"{where}: network {network.arch!r} is not registered here; import "
                          f"the module that registers it (--import MODULE; known: "
                          f"{', '.join(nets.available_nets())})")
    model = nets.get_net(network.arch, network.num_classes, **network.options)
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), np.zeros((1, *network.image_shape), np.float32), train=False))
    want = {p: tuple(v.shape) for p, v in masks_lib.flat_dict(
        {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}).items()}
    have = {p: tuple(np.shape(v)) for p, v in masks_lib.flat_dict(
        {"params": variables["params"], "batch_stats": variables.get("batch_stats") or {}}).items()}
    if want != have:
        bad = sorted(p for p in set(want) | set(have) if want.get(p) != have.get(p))[0]
        raise TicketError(
            f"{where} does not fit {network.arch} with {network.num_classes} classes on "
            f"{'x'.join(map(str, network.image_shape))} images: {bad} is {have.get(bad)} in the "
            f"checkpoint, {want.get(bad)} in the network; pass the right --arch")
    return model


# --------------------------------------------------------------------------- tickets


@dataclasses.dataclass
class Ticket:
    """A checkpoint's arrays (numpy), metadata and network; ``model`` is None where the
    network cannot be named (``network.missing()`` says what would name it)."""
    ref: CheckpointRef
    meta: dict
    params: dict
    batch_stats: dict
    masks: Any
    channel_masks: Any
    network: NetworkSpec
    model: Any = None
    config: dict = dataclasses.field(default_factory=dict)

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}

    @property
    def path(self) -> pathlib.Path:
        return self.ref.path


def load(path, *, round_idx: Optional[int] = None, kind: str = paths_lib.FINAL,
         arch: Optional[str] = None, dataset: Optional[str] = None,
         image_shape: Optional[Sequence[int]] = None, options: Optional[dict] = None,
         need_model: bool = True) -> Ticket:
    """Open the ticket at ``path`` (see the module docstring). With ``need_model`` a
    network that cannot be named is a TicketError saying what to pass."""
    ref = resolve(path, round_idx=round_idx, kind=kind) if not isinstance(path, CheckpointRef) \
        else path
    arrays, meta, ref = read(ref)
    network = describe(ref, meta, arrays["params"], arch=arch, dataset=dataset,
                       image_shape=image_shape, options=options)
    model = None
    if network.complete:
        model = model_of(network, arrays, ref.path)
    elif need_model:
        raise TicketError(f"{ref.path}: cannot tell its network's {' and '.join(network.missing())} "
                          f"(neither its metadata nor its run's config.json say); open a "
                          f"checkpoint inside its run directory")
    return Ticket(ref=ref, meta=meta, params=arrays["params"], batch_stats=arrays["batch_stats"],
                  masks=arrays["masks"], channel_masks=arrays["channel_masks"], network=network,
                  model=model, config=run_config(ref))


__all__ = ["TicketError", "CheckpointRef", "list_checkpoints", "resolve", "read", "NetworkSpec",
           "describe", "model_of", "run_config", "Ticket", "load", "KINDS"]
