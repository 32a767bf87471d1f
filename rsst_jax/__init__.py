"""rsst-jax: structurally sparse lottery tickets (IMP, Refill, RSST) in JAX/Flax/Optax.

The functional API, all pure functions on pytrees:

- ``rsst_jax.masks``: mask pytrees; ``init_masks``, ``apply_masks``, ``magnitude_prune``,
  ``random_prune``, ``filter_prune``, ``refill``, ``rsst_targets``, ``density``,
  ``channel_sparsity``, ``report``, and the optax transformation ``keep_pruned``.
- ``rsst_jax.criteria``: ``channel_scores`` and the criterion registry.
- ``rsst_jax.regularizers``: lambda schedules and the optax transformation ``rsst_penalty``.
- ``rsst_jax.nets``: the network registry (``get_net``, ``register_net``).
- ``rsst_jax.data``: offline data sets and in-jit augmentation.
- ``rsst_jax.train``: train state, optimizer, jit-compiled train and eval steps.
- ``rsst_jax.model_masks``: what training reads off the model by running it: the stem,
  conv/BatchNorm pairs, ``bn_masks``, ``merge_masks``, ``masked_variables``.
- ``rsst_jax.compact(net, variables, masks)``: a physically narrower network computing the
  same function (the function; ``rsst_jax.channel_flow`` decides which channels go and
  each ``rsst_jax.nets`` family registers its rebuilder).
- ``rsst_jax.counting``: parameters, MACs and FLOPs (dense, masked, compact).
- ``rsst_jax.config``: the settings as typed groups (``Config``), each flag declared once
  with its facts (``flag``).
- ``rsst_jax.methods``: the pruning methods as registered objects (IMP, Refill, RSST, one
  module each; ``register_method`` adds yours, docs/methods.md).
- ``rsst_jax.rounds``: what every method's rounds share, as pure functions (masks, plans,
  channel scores, rewinding); ``rsst_jax.trees``: the pytree helpers.
- ``rsst_jax.engine``: ``Engine``, the compiled programs of K tickets trained as one.
- ``rsst_jax.driver``: ``run(configs)``, the loop behind ``python -m experiments.run``,
  with ``rsst_jax.callbacks`` for its side effects and ``rsst_jax.paths`` for its files.
  ``docs/api.md`` shows a loop of your own.
- ``rsst_jax.runs`` reads a run directory (summaries, logs); ``rsst_jax.tickets.load(path)``
  opens any of its checkpoints with the network that reads it.
"""
from rsst_jax import (  # noqa: F401
    callbacks, checkpoint, config, counting, criteria, data, driver, engine, masks, methods,
    model_masks, nets, paths, regularizers, rounds, runs, tickets, train, trees)
from rsst_jax.compact import compact  # noqa: F401  (the function: rsst_jax.compact(...))
from rsst_jax.criteria import channel_scores, register_criterion  # noqa: F401
from rsst_jax.masks import (  # noqa: F401
    apply_masks, channel_sparsity, density, filter_prune, init_masks, keep_pruned,
    magnitude_prune, prunable, random_prune, refill, report, rsst_targets)
from rsst_jax.nets import get_net, register_net  # noqa: F401
from rsst_jax.regularizers import lambda_schedule, rsst_penalty  # noqa: F401

__version__ = "0.2.0"
