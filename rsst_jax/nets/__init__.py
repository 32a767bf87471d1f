"""Network registry: ``get_net(name, num_classes, **kwargs)`` builds a Flax linen module.

Every network takes NHWC images and is called as ``model.apply(variables, x, train=...)``.
Adding a network is one file whose factory is decorated with ``@register_net(name)``
(from ``rsst_jax.nets.registry``, where the registries live) and imported in this file.

A family whose pruned channels ``rsst_jax.compact`` can physically remove also registers,
in its own file, how to rebuild it narrower: ``@register_rebuild(ModuleClass)`` on
``fn(model, shapes, keep) -> narrower model``; ``get_rebuild(model)`` finds it.
"""
from rsst_jax.nets.registry import (  # noqa: F401  (the registry's names, re-exported)
    _REBUILDERS,
    _REGISTRY,
    NetFactory,
    Rebuilder,
    available_nets,
    get_net,
    get_rebuild,
    kernel_width,
    net_options,
    rebuild_families,
    register_net,
    register_rebuild,
    registered_module,
)

# Each model file registers itself with the decorators of rsst_jax.nets.registry.
from rsst_jax.nets import mobilenet, resnet, resnet_cifar, vgg  # noqa: F401
from rsst_jax.nets.mobilenet import MobileNet
from rsst_jax.nets.resnet import ResNet
from rsst_jax.nets.resnet_cifar import ResNetCifar
from rsst_jax.nets.vgg import VGG

__all__ = ["register_net", "get_net", "available_nets", "net_options", "registered_module",
           "register_rebuild", "get_rebuild", "rebuild_families", "kernel_width",
           "ResNetCifar", "ResNet", "VGG", "MobileNet"]
