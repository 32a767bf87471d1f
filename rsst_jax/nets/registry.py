"""The network and rebuilder registries (``rsst_jax.nets`` re-exports every name).

In a module of its own so that the model files import it without importing the package
that imports them (no import cycle).
"""
import functools
import inspect
from typing import Callable, Dict, List

import flax.linen as nn

NetFactory = Callable[..., nn.Module]
_REGISTRY: Dict[str, NetFactory] = {}


def register_net(name: str) -> Callable[[NetFactory], NetFactory]:
    """Decorator registering ``factory(num_classes, **kwargs) -> nn.Module`` under ``name``."""
    def decorator(factory: NetFactory) -> NetFactory:
        if name in _REGISTRY:
            raise ValueError(f"arch {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory
    return decorator


def get_net(name: str, num_classes: int, **kwargs) -> nn.Module:
    """The module registered as ``name`` with a ``num_classes``-way classifier."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown arch {name!r}; choose one of: {', '.join(available_nets())}")
    return _REGISTRY[name](num_classes, **kwargs)


def net_options(name: str) -> List[str]:
    """Keyword options the factory of ``name`` accepts besides ``num_classes``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown arch {name!r}; choose one of: {', '.join(available_nets())}")
    params = inspect.signature(_REGISTRY[name]).parameters
    return [p for p in params if p != "num_classes"]


def registered_module(name: str):
    """The module whose factory is registered as ``name`` (None for an unknown name)."""
    factory = _REGISTRY.get(name)
    while isinstance(factory, functools.partial):  # a partial's __module__ is 'functools'
        factory = factory.func
    return None if factory is None else getattr(factory, "__module__", None)


def available_nets() -> List[str]:
    """Sorted names of the registered networks."""
    return sorted(_REGISTRY)


Rebuilder = Callable[[nn.Module, dict, dict], nn.Module]
_REBUILDERS: Dict[type, Rebuilder] = {}


def register_rebuild(cls: type) -> Callable[[Rebuilder], Rebuilder]:
    """Decorator: ``fn(model, shapes, keep) -> narrower model`` for networks of class ``cls``.

    ``shapes`` maps 'params/...' paths to the compact variables' shapes; ``keep`` maps a
    variable path to {axis: bool array of kept original positions}.
    """
    def decorator(fn: Rebuilder) -> Rebuilder:
        _REBUILDERS[cls] = fn
        return fn
    return decorator


def get_rebuild(model: nn.Module) -> Rebuilder:
    """The rebuilder registered for ``type(model)``."""
    if type(model) not in _REBUILDERS:
        raise ValueError(f"no compaction rebuilder for {type(model).__name__}; register one "
                         f"with rsst_jax.nets.register_rebuild")
    return _REBUILDERS[type(model)]


def rebuild_families() -> Dict[str, type]:
    """``{class name: class}`` of the network families that have a rebuilder."""
    return {cls.__name__: cls for cls in _REBUILDERS}


def kernel_width(shapes: dict, module: str) -> int:
    """Output channels of ``module``'s kernel in ``shapes`` (a rebuilder's argument)."""
    return int(shapes[f"params/{module}/kernel"][-1])
