"""Pruning methods as registered objects: ``--struct NAME`` picks one.

IMP (``none``), Refill (``refill``) and RSST (``rsst``), and the baselines network
slimming (``slimming``), SSL group lasso (``ssl``), growing regularization (``greg``) and
DepGraph group pruning (``group``) are each one module here (docs/baselines.md compares
them); a method of your own is one module anywhere (docs/methods.md): subclass
:class:`Method`, override what differs, decorate it with :func:`register_method`, and
pass ``--import MODULE`` to any command.
"""
from rsst_jax.methods.base import Method, Penalty, Scoring, TicketValues
from rsst_jax.methods.registry import (available_methods, find_method, get_method,
                                       register_method, registered, registered_module, union)
from rsst_jax.methods import imp, refill, rsst  # noqa: F401,E402  (registers the built-ins)
from rsst_jax.methods import slimming, ssl, greg, group  # noqa: F401,E402  (the baselines)


def of(cfg):
    """The method of configuration ``cfg`` (its ``--struct``)."""
    return get_method(cfg.prune.struct)


__all__ = ["Method", "Penalty", "Scoring", "TicketValues", "register_method", "get_method",
           "find_method", "available_methods", "registered", "registered_module", "union", "of",
           "imp", "refill", "rsst", "slimming", "ssl", "greg", "group"]
