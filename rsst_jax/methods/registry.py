"""The method registry: ``--struct NAME`` -> the registered :class:`~rsst_jax.methods.Method`.

In a module of its own, importing nothing of the library, so that the configuration
can ask it (``--mask_bn``'s default, validation) without an import cycle; the methods
themselves import the configuration to declare their flags.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional

_REGISTRY: Dict[str, Any] = {}


def register_method(cls_or_instance=None, *, replace: bool = False):
    """Register a method (a ``Method`` subclass, instantiated here, or an instance) under
    its ``name``, the value of ``--struct``; usable as a class decorator. Returns what it
    was given. A name taken by another method is an error unless ``replace``."""
    def add(obj):
        method = obj() if inspect.isclass(obj) else obj
        name = getattr(method, "name", "")
        if not name or not isinstance(name, str):
            raise ValueError(f"{obj!r} has no name: set the class attribute name = '...'")
        old = _REGISTRY.get(name)
        if old is not None and not replace and type(old) is not type(method):
            raise ValueError(f"method {name!r} is already registered "
                             f"({type(old).__module__}.{type(old).__name__})")
        _REGISTRY[name] = method
        return obj
    return add if cls_or_instance is None else add(cls_or_instance)


def get_method(name: str):
    """The method registered as ``name``; ValueError naming the registered ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown --struct {name!r}; choose one of: "
                         f"{', '.join(available_methods())}; or register your own with "
                         f"rsst_jax.methods.register_method in a module and pass --import MODULE")
    return _REGISTRY[name]


def find_method(name: Optional[str]):
    """The method registered as ``name``, or None (a run written by a method whose module
    is not imported)."""
    return _REGISTRY.get(name) if isinstance(name, str) else None


def available_methods() -> List[str]:
    """Names of the registered methods, in registration order (IMP, Refill, RSST first)."""
    return list(_REGISTRY)


def registered() -> List[Any]:
    """The registered methods, in registration order."""
    return list(_REGISTRY.values())


def registered_module(name: str) -> Optional[str]:
    """The module that defines the method registered as ``name`` (None if unknown)."""
    method = _REGISTRY.get(name)
    return None if method is None else type(method).__module__


def union(attribute: str) -> tuple:
    """The values of a tuple attribute over every registered method, without repeats, in
    registration order (e.g. the summary columns every method adds)."""
    out: Dict[str, None] = {}
    for method in _REGISTRY.values():
        out.update(dict.fromkeys(getattr(method, attribute, ())))
    return tuple(out)


__all__ = ["register_method", "get_method", "find_method", "available_methods", "registered",
           "registered_module", "union"]
