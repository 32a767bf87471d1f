"""A tiny network and data set so that whole runs take seconds in tests."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from rsst_jax import config as config_lib
from rsst_jax import data as data_lib
from rsst_jax import nets


class TinyCNN(nn.Module):
    """conv1 -> conv2 -> conv3 (each BN + ReLU) -> global average pool -> fc."""
    num_classes: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        for i, width in enumerate((8, 12, 16)):
            x = nn.Conv(width, (3, 3), padding=1, use_bias=False, name=f"conv{i + 1}",
                        dtype=self.dtype)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             name=f"bn{i + 1}", dtype=self.dtype)(x)
            x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc", dtype=self.dtype)(x).astype(jnp.float32)


if "tiny_cnn" not in nets.available_nets():
    nets.register_net("tiny_cnn")(lambda num_classes, **kw: TinyCNN(num_classes, **kw))


@functools.lru_cache(maxsize=None)
def tiny_digits(n_train: int = 320) -> data_lib.Dataset:
    """Digits at 8x8 (every 4th pixel of the 32x32 version), ``n_train`` training images."""
    ds = data_lib.load_dataset("digits")
    small = lambda x: np.ascontiguousarray(x[:, ::4, ::4, :])  # noqa: E731
    return data_lib.Dataset(
        name="tiny_digits", train_x=small(ds.train_x[:n_train]), train_y=ds.train_y[:n_train],
        val_x=small(ds.val_x[:100]), val_y=ds.val_y[:100], test_x=small(ds.test_x[:100]),
        test_y=ds.test_y[:100], num_classes=10, mean=ds.mean, std=ds.std, flip=False)


def tiny_config(save_dir, **overrides) -> config_lib.Config:
    """A validated config for a seconds-long run of the tiny network on tiny digits."""
    values = dict(dataset="digits", arch="tiny_cnn", save_dir=str(save_dir), epochs=2,
                  batch_size=64, lr=0.1, warmup=0, decreasing_lr="100", pruning_times=3,
                  eval_batch_size=100, struct="none", seed=0)
    values.update(overrides)
    return config_lib.validate(config_lib.Config.from_dict(values))


def use_tiny_data(monkeypatch, n_train: int = 320):
    """Make every run in this test load ``tiny_digits`` whatever --dataset says."""
    ds = tiny_digits(n_train)
    monkeypatch.setattr(data_lib, "load_dataset", lambda name, data_dir=None, seed=0: ds)


class _Capture:
    """A callback that keeps the driver's ``Run`` (engine, tickets, states)."""
    run = None

    def __getattr__(self, name):
        return lambda *args: None

    def run_start(self, run):
        self.run = run


def quiet_run(cfgs, **kw):
    """``driver.run`` without output; returns (summary rows of the first ticket, the Run)."""
    from rsst_jax import callbacks, driver
    cfgs = cfgs if isinstance(cfgs, list) else [cfgs]
    capture = _Capture()
    rows = driver.run(cfgs, callbacks=callbacks.default_callbacks(cfgs[0], progress=False)
                      + [capture], log=lambda s: None, **kw)
    return rows[0], capture.run
