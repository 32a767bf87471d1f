"""Pruning methods as registered objects: ``--struct NAME`` picks one.

IMP (``none``), Refill (``refill``) and RSST (``rsst``) are each one module here; a
method of your own is one module anywhere (docs/methods.md): subclass :class:`Method`,
override what differs, decorate it with :func:`register_method`, and pass
``--import MODULE`` to any command.
"""
from rsst_jax.methods.base import Method
from rsst_jax.methods.registry import (available_methods, find_method, get_method,
                                       register_method, registered, registered_module, union)
from rsst_jax.methods import imp, refill, rsst  # noqa: F401,E402  (registers the built-ins)


def of(cfg):
    """The method of configuration ``cfg`` (its ``--struct``)."""
    return get_method(cfg.prune.struct)


__all__ = ["Method", "register_method", "get_method", "find_method", "available_methods",
           "registered", "registered_module", "union", "of", "imp", "refill", "rsst"]
