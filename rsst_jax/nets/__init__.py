"""Network registry: ``get_net(name, num_classes, **kwargs)`` builds a Flax linen module.

Every network takes NHWC images and is called as ``model.apply(variables, x, train=...)``.
Adding a network is one file whose factory is decorated with ``@register_net(name)``
and imported at the bottom of this file.
"""
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
    import inspect
    if name not in _REGISTRY:
        raise ValueError(f"unknown arch {name!r}; choose one of: {', '.join(available_nets())}")
    params = inspect.signature(_REGISTRY[name]).parameters
    return [p for p in params if p != "num_classes"]


def available_nets() -> List[str]:
    """Sorted names of the registered networks."""
    return sorted(_REGISTRY)


# Imported last: each model file registers itself with the decorator above.
from rsst_jax.nets import mobilenet, resnet, resnet_cifar, vgg  # noqa: E402,F401
from rsst_jax.nets.mobilenet import MobileNet  # noqa: E402,F401
from rsst_jax.nets.resnet import ResNet  # noqa: E402,F401
from rsst_jax.nets.resnet_cifar import ResNetCifar  # noqa: E402,F401
from rsst_jax.nets.vgg import VGG  # noqa: E402,F401

__all__ = ["register_net", "get_net", "available_nets", "net_options",
           "ResNetCifar", "ResNet", "VGG", "MobileNet"]
