"""Speed features keep the numbers: fused epochs, bf16, gradient accumulation, data
parallelism over a mesh, and the benchmark command."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsst_jax import checkpoint as ckpt
from rsst_jax import train as train_lib

from tiny import quiet_run, tiny_config, use_tiny_data

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _quiet(cfg):
    return quiet_run(cfg)[1]


def _final_tree(save_dir, r):
    tree, _ = ckpt.restore_raw(pathlib.Path(save_dir) / f"round_{r}" / "final")
    return {"params": tree["params"], "batch_stats": tree["batch_stats"]}


def _assert_trees_close(a, b, atol):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb) and la
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


# ------------------------------------------------------------------------ fused epochs

def test_fused_is_on_by_default_and_unrolled_in_short_chunks_on_cpu():
    assert train_lib.use_fused("auto") is True and train_lib.use_fused("on")
    assert train_lib.use_fused("off") is False
    with pytest.raises(ValueError, match="auto, on or off"):
        train_lib.use_fused("yes")
    assert train_lib.fused_unroll("cpu") is True and train_lib.fused_unroll("gpu") == 1
    assert train_lib.default_fused_steps(50, "cpu") == train_lib.CPU_FUSED_STEPS == 8
    assert train_lib.default_fused_steps(50, "gpu") == 50
    # K tickets on CPU share the unrolled steps of one chunk; accelerators loop
    assert [train_lib.default_fused_steps(50, "cpu", k) for k in (1, 2, 4, 8, 16)] == \
        [8, 4, 2, 1, 1]
    assert train_lib.default_fused_steps(50, "gpu", 8) == 50


@pytest.mark.parametrize("k", [1, 3])
def test_cpu_chunks_compile_to_straight_line_code_and_accelerator_chunks_to_a_loop(k):
    """Any chunk length, 1 included (the remainder chunk of a 9-step epoch in chunks of
    8: ``lax.scan(unroll=True)`` of length 1 is a one-trip loop, 40x slower on CPU)."""
    def step(s, data_x, data_y, idx, scale):
        return s + jnp.sum(data_x[idx]) * scale, {"loss": s}
    args = (jnp.float32(0), jnp.ones((8,)), jnp.ones((8,)), jnp.zeros((k, 2), jnp.int32),
            jnp.float32(1))
    for unroll, loops in ((train_lib.fused_unroll("cpu"), False),
                          (train_lib.fused_unroll("gpu"), True)):
        chunk = jax.jit(train_lib.make_epoch_fn(step, unroll=unroll))
        assert ("while" in chunk.lower(*args).compile().as_text()) is loops
        state, metrics = chunk(*args)
        assert float(state) == 2.0 * k
        assert metrics["loss"].tolist() == [2.0 * i for i in range(k)]


@pytest.mark.slow
@pytest.mark.parametrize("unroll", [True, 1], ids=["unrolled_cpu_form", "loop_gpu_form"])
def test_fused_chunks_equal_the_step_loop(tmp_path, monkeypatch, unroll):
    """RSST round (masks + penalty targets) with chunks of 3 steps (5 steps per epoch:
    a chunk of 3 and the remainder of 2) against the step-by-step loop, same seed; the
    chunk unrolled (as on CPU) and as a loop (as on accelerators)."""
    use_tiny_data(monkeypatch)
    monkeypatch.setattr(train_lib, "fused_unroll", lambda platform=None: unroll)
    kw = dict(struct="rsst", criteria="magnitude", pruning_times=2, epochs=2, rate=0.5,
              RST_schedule="x", update_reg_interval=1, reg_granularity_prune=0.5)
    loop = _quiet(tiny_config(tmp_path / "loop", fused="off", **kw)).engine
    fused = _quiet(tiny_config(tmp_path / "fused", fused="on", fused_steps=3, **kw)).engine
    assert fused.fused and not loop.fused
    assert fused.train_chunk._cache_size() == 2  # chunk of 3 and the remainder, every round
    for r in (0, 1):
        _assert_trees_close(_final_tree(tmp_path / "loop", r), _final_tree(tmp_path / "fused", r),
                            atol=1e-6)
    a = [json.loads(x) for x in (tmp_path / "loop" / "log.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "fused" / "log.jsonl").read_text().splitlines()]
    for ra, rb in zip(a, b):
        assert ra["train_acc"] == rb["train_acc"] and ra["val_acc"] == rb["val_acc"]
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)


# ------------------------------------------------------------------------ bf16

@pytest.mark.slow
def test_bf16_computes_in_bf16_keeps_fp32_state_and_trains_like_fp32(tmp_path, monkeypatch):
    use_tiny_data(monkeypatch)
    kw = dict(pruning_times=1, epochs=3)
    _quiet(tiny_config(tmp_path / "fp32", **kw))
    run = _quiet(tiny_config(tmp_path / "bf16", precision="bf16", **kw)).engine
    state = run.fresh_state(0)
    x = jnp.zeros((2, *run.ds.image_shape), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda v: run.model.apply(v, x, train=True,
                                                     mutable=["batch_stats"]))(state.variables)
    assert "conv_general_dilated" in str(jaxpr)
    assert all("bf16" in str(e) for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated")
    tree = _final_tree(tmp_path / "bf16", 0)
    dtypes = {np.asarray(v).dtype for v in jax.tree_util.tree_leaves(tree)}
    assert dtypes == {np.dtype(np.float32)}  # weights and BatchNorm statistics stay fp32
    opt_dtypes = {v.dtype for v in jax.tree_util.tree_leaves(state.opt_state)
                  if jnp.issubdtype(v.dtype, jnp.floating)}
    assert opt_dtypes == {jnp.dtype(jnp.float32)}
    lb = [json.loads(x) for x in (tmp_path / "bf16" / "log.jsonl").read_text().splitlines()]
    lf = [json.loads(x) for x in (tmp_path / "fp32" / "log.jsonl").read_text().splitlines()]
    assert lb[-1]["train_loss"] < lb[0]["train_loss"]  # it trains
    for b, f in zip(lb, lf):  # and follows the fp32 run closely
        assert b["train_loss"] == pytest.approx(f["train_loss"], abs=0.02)
        assert b["train_loss"] != f["train_loss"]  # but did compute in a different precision


# ------------------------------------------------------------------------ accumulation

class _NoBN(nn.Module):
    """conv -> relu -> conv -> mean -> dense: no batch statistics, so accumulation is exact."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(nn.Conv(6, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(8, (3, 3), name="conv2")(x))
        return nn.Dense(10, name="fc")(jnp.mean(x, (1, 2)))


def _one_step(model, accum_steps, *, batch=16, bn_free=True):
    rng = np.random.default_rng(0)
    data_x = jnp.asarray(rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8))
    data_y = jnp.asarray(rng.integers(0, 10, (40,)).astype(np.int32))
    tx = train_lib.make_optimizer(optimizer="sgd", momentum=0.9, weight_decay=1e-4)
    cfg = train_lib.StepConfig(flip=True, mean=(0.5,) * 3, std=(0.25,) * 3,
                               accum_steps=accum_steps)
    state = train_lib.create_train_state(model, tx, jax.random.PRNGKey(0), (8, 8, 3))
    step = jax.jit(train_lib.gather_step(train_lib.make_train_step(
        model, tx, cfg, train_lib.Schedules(steps_per_epoch=10, total_steps=10))))
    plan = train_lib.Plan(masks=None, targets=None, reg_scale=1.0,
                          hyper=train_lib.Hyper.make(0.1))
    idx = jnp.asarray(rng.permutation(40)[:batch].astype(np.int32))
    metrics = []
    for _ in range(2):  # the second step sees momentum from the first
        state, m = step(state, data_x, data_y, idx, plan)
        metrics.append(m)
    return state, metrics


@pytest.mark.parametrize("accum_steps", [2, 4])
def test_accumulation_equals_one_big_batch_without_batchnorm(accum_steps):
    big, mb = _one_step(_NoBN(), 1)
    acc, ma = _one_step(_NoBN(), accum_steps)
    _assert_trees_close(big.params, acc.params, atol=2e-6)
    for a, b in zip(mb, ma):
        assert int(a["correct"]) == int(b["correct"])
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)


def test_accumulation_updates_batchnorm_statistics_per_micro_batch():
    from tiny import TinyCNN
    big, _ = _one_step(TinyCNN(10), 1)
    acc, _ = _one_step(TinyCNN(10), 4)
    # Four momentum-0.9 updates per step instead of one: the running variance moves
    # further from its initial 1 (4 * 2 updates vs 2).
    v_big = np.asarray(big.batch_stats["bn1"]["var"])
    v_acc = np.asarray(acc.batch_stats["bn1"]["var"])
    assert np.all(np.abs(v_acc - 1.0) > np.abs(v_big - 1.0))


def test_accumulation_needs_a_divisible_batch(tmp_path):
    from rsst_jax import config as config_lib
    with pytest.raises(config_lib.ConfigError, match="multiple of --accum_steps"):
        tiny_config(tmp_path, batch_size=64, accum_steps=3)


# ------------------------------------------------------------------------ data parallel

_PARALLEL_SCRIPT = textwrap.dedent("""
    import json, pathlib, sys
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    from rsst_jax import checkpoint as ckpt, masks as masks_lib, parallel, trees
    import tiny
    from rsst_jax import data as data_lib
    ds = tiny.tiny_digits(320)
    data_lib.load_dataset = lambda name, data_dir=None, seed=0: ds
    cfg = tiny.tiny_config({save!r}, struct="rsst", criteria="magnitude", pruning_times=2,
                           epochs=1, rate=0.5, RST_schedule="x", update_reg_interval=1,
                           reg_granularity_prune=0.5, fused={fused!r}, fused_steps=2)
    run = tiny.quiet_run(cfg)[1].engine
    save = pathlib.Path({save!r})
    for r in (0, 1):
        tree, _ = ckpt.restore_raw(save / f"round_{{r}}" / "final")
        leaves = jax.tree_util.tree_leaves({{"p": tree["params"], "b": tree["batch_stats"]}})
        np.savez(save / f"final_{{r}}.npz", *leaves)
    out = dict(devices=jax.device_count(), mesh=None if run.mesh is None else run.mesh.size)
    state = run.fresh_state(0)
    if run.mesh is not None:
        plan = run.plan(cfg, masks_lib.init_masks(state.params))
        plan = parallel.replicate(trees.stack([plan.step]), run.mesh)
        st = parallel.replicate(trees.stack([state]), run.mesh)
        idx = parallel.shard_batch(np.arange(cfg.optim.batch_size, dtype=np.int32)[None],
                                   run.mesh, 1)
        hlo = run.train_step.lower(st, run.dev["train_x"], run.dev["train_y"], idx,
                                   plan).compile().as_text()
        out["all_reduce"] = "all-reduce" in hlo
        sharding = jax.tree_util.tree_leaves(st.params)[0].sharding
        out["params_replicated_on"] = len(sharding.device_set) if sharding.is_fully_replicated else 0
    print("RESULT " + json.dumps(out))
""")


def _run_devices(tmp_path, n_devices, fused):
    save = tmp_path / f"d{n_devices}_{fused}"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}")
    script = _PARALLEL_SCRIPT.format(tests=str(ROOT / "tests"), save=str(save), fused=fused)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return save, json.loads(line[len("RESULT "):])


def test_cpu_mesh_uses_the_most_devices_that_divide_the_batch():
    from rsst_jax import parallel
    assert parallel.mesh_size(4, 128, "cpu") == 4
    assert parallel.mesh_size(4, 6, "cpu") == 3
    assert parallel.mesh_size(4, 7, "cpu") == 1
    assert parallel.mesh_size(4, 6, "gpu") == 4  # accelerators: all, the run checks the batch


def test_tickets_spread_over_the_most_devices_that_divide_them():
    from rsst_jax import parallel
    assert parallel.ticket_devices(8, 8) == 8    # one ticket per device
    assert parallel.ticket_devices(16, 8) == 8   # two per device
    assert parallel.ticket_devices(2, 8) == 2    # six devices idle: tickets do not split
    assert parallel.ticket_devices(6, 4) == 3    # two per device on three of four
    assert parallel.ticket_devices(3, 2) == 1    # no even split: one device
    assert parallel.ticket_devices(1, 8) == 1
    assert parallel.ticket_mesh(2, jax.devices()[:1]) is None


def test_runs_keep_compiled_programs_where_asked_and_not_when_off(tmp_path):
    from rsst_jax import parallel
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", parallel.CACHE_ENV)}
    code = ("from rsst_jax import parallel; import jax; d = parallel.enable_compilation_cache(); "
            "print(d, jax.config.jax_compilation_cache_dir)")
    cases = {"explicit": ({parallel.CACHE_ENV: str(tmp_path / "c")}, str(tmp_path / "c")),
             "default": ({"XDG_CACHE_HOME": str(tmp_path / "x")},
                         str(tmp_path / "x" / "rsst_jax" / "jax")),
             "off": ({parallel.CACHE_ENV: "off", "XDG_CACHE_HOME": str(tmp_path / "o")}, None)}
    for name, (extra, want) in cases.items():
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                             text=True, env=dict(env, JAX_PLATFORMS="cpu", **extra), timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == [str(want), str(want)], (name, out.stdout)
        assert want is None or pathlib.Path(want).is_dir()
    assert not (tmp_path / "o").exists()  # off: nothing written


def test_split_cpu_makes_cpu_devices_before_jax_runs_and_nothing_after(monkeypatch):
    from rsst_jax import parallel
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", parallel.CPU_DEVICES_ENV)}
    code = ("from rsst_jax import parallel; import jax; n = parallel.split_cpu(); "
            "print(n, jax.device_count())")
    for value, want in ((None, ["1", "1"]), ("4", ["4", "4"])):  # off unless asked for
        extra = {} if value is None else {parallel.CPU_DEVICES_ENV: value}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                             text=True, env=dict(env, JAX_PLATFORMS="cpu", **extra), timeout=300)
        assert out.stdout.split() == want, out.stderr[-2000:]
    jax.devices()  # in this process the backend is up: too late, left alone
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert parallel.split_cpu(4) == 0 and jax.device_count() == 1


@pytest.mark.slow
def test_two_devices_equal_one_device(tmp_path):
    """Batch split over 2 (virtual CPU) devices, BatchNorm over the global batch:
    the same parameters and BatchNorm statistics as on one device."""
    one, info1 = _run_devices(tmp_path, 1, "off")
    assert info1["mesh"] is None
    for fused in ("off", "on"):  # step loop and fused chunks (perm split on its axis 1)
        two, info2 = _run_devices(tmp_path, 2, fused)
        assert info2["mesh"] == 2
        assert info2["all_reduce"]  # gradients and batch statistics reduced across devices
        assert info2["params_replicated_on"] == 2
        for r in (0, 1):
            a, b = np.load(one / f"final_{r}.npz"), np.load(two / f"final_{r}.npz")
            assert len(a.files) == len(b.files) > 0
            for k in a.files:
                np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5)
        # the checkpoint written on 2 devices restores raw in this 1-device process
        tree, _ = ckpt.restore_raw(two / "round_1" / "final")
        raw = jax.tree_util.tree_leaves({"p": tree["params"], "b": tree["batch_stats"]})
        b = np.load(two / "final_1.npz")
        assert len(raw) == len(b.files)
        for i, leaf in enumerate(raw):
            np.testing.assert_array_equal(leaf, b[f"arr_{i}"])
        s1 = json.loads((one / "summary.json").read_text())
        s2 = json.loads((two / "summary.json").read_text())
        assert [r["remaining_weight_pct"] for r in s1] == [r["remaining_weight_pct"] for r in s2]


# ------------------------------------------------------------------------ benchmark

def test_bench_reports_every_variant_epochs_and_tickets():
    from experiments import bench
    args = bench.parse_args(["--arch", "tiny_cnn", "--batch_size", "8", "--image_shape", "8,8,3",
                             "--steps", "2", "--warmup", "1", "--train_size", "40",
                             "--epochs", "1", "--fused_steps", "2", "--num_seeds", "1,2",
                             "--eval_batch_size", "16", "--eval_reps", "1"])
    r = bench.run(args)
    assert set(r["step_ms"]) == {"dense", "imp", "refill", "rsst"}
    assert r["ratio_to_dense"]["dense"] == 1.0
    assert all(v > 0 for v in r["images_per_s"].values())
    # one program per transformation a method adds: IMP and Refill add none, RSST its penalty
    assert set(r["compile_s"]) == {"dense", "masked", "rsst"}
    e = r["epochs"]  # a run's epoch: 5 steps in chunks of 2, 2 and the remainder 1
    assert e["on"]["steps"] == 5 and e["on"]["fused"] and not e["off"]["fused"]
    assert e["speedup"] > 0 and e["auto"] in ("on", "off")
    assert [t["num_seeds"] for t in r["tickets"]] == [1, 2]
    assert all(t["images_per_s"] > 0 for t in r["tickets"])
    assert r["eval"]["images_per_s"] > 0 and "peak_memory_mb" in r
    text = bench.format_table(r)
    assert "vs dense" in text and "--fused auto runs" in text and "2 tickets" in text
    json.dumps(r)


@pytest.mark.parametrize("argv, message", [
    (["--arch", "resnet999"], "unknown --arch 'resnet999'"),
    (["--batch_size", "0"], "--batch_size wants positive integers"),
    (["--image_shape", "32,32"], "--image_shape wants H,W,C"),
    (["--arch", "res20s,vgg16_bn"], "need --epoch_table"),
    (["--batch_size", "128", "--train_size", "64"], "larger than --train_size"),
    (["--num_seeds", "0"], "--num_seeds wants positive integers"),
    (["--variants", "foo"], "unknown --variants"),
    (["--steps", "x"], "argument --steps: invalid int value"),
])
def test_bench_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    from experiments import bench
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


# ------------------------------------------------------------------------ many tickets

def _rounding_tolerance(run_dir, perturbed_dir, make_cfg, reduction: int) -> list[float]:
    """Per round, how far training carries a rounding-sized change: the final weights of
    the run in ``run_dir`` against a twin started from its W0 scaled by
    ``1 +- sqrt(reduction) * eps32`` (random signs).

    Two programs that compute the same step (a ticket vmapped with others, or alone) may
    sum every reduction in another order (XLA picks loop orders and convolution
    algorithms per program and per CPU); over ``reduction`` terms that moves a result by
    about ``sqrt(reduction) * eps`` relative. The twin shows what that costs once training
    has amplified it, on this machine, for this computation.
    """
    raw, meta = ckpt.restore_raw(pathlib.Path(run_dir) / "init")
    delta = np.sqrt(reduction) * np.finfo(np.float32).eps
    rng = np.random.default_rng(0)
    scaled = jax.tree_util.tree_map(
        lambda a: (a * (1 + delta * rng.choice([-1.0, 1.0], a.shape))).astype(a.dtype)
        if a.dtype.kind == "f" else a, raw)
    ckpt.save(pathlib.Path(perturbed_dir) / "init", 0, scaled, meta)
    cfg = make_cfg(perturbed_dir)
    _quiet(cfg.replace(init=str(pathlib.Path(perturbed_dir) / "init")))
    out = []
    for r in range(cfg.prune.pruning_times):
        a, b = _final_tree(run_dir, r), _final_tree(perturbed_dir, r)
        out.append(max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
                       zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))))
    return out


_TWO_DEVICE_TICKETS = textwrap.dedent("""
    import json, pathlib, sys
    sys.path.insert(0, {tests!r})
    import jax
    from tiny import tiny_config, tiny_digits
    from experiments.run import seed_configs
    from rsst_jax import callbacks, data as data_lib, driver
    ds = tiny_digits(320)
    data_lib.load_dataset = lambda name, data_dir=None, seed=0: ds
    seen = []

    class Where(callbacks.Callback):
        def epoch_trained(self, run, r, epoch, metrics):
            leaf = jax.tree_util.tree_leaves(run.states.params)[0]
            seen.append([run.engine.ticket_devices, len(leaf.sharding.device_set),
                         leaf.sharding.is_fully_replicated])

    cfgs = seed_configs(tiny_config(pathlib.Path({save!r}), seed=3, num_seeds=2, **{kw!r}))
    rows = driver.run(cfgs, callbacks=callbacks.default_callbacks(cfgs[0], progress=False)
                      + [Where()], log=lambda s: None)
    print("RESULT " + json.dumps({{"rounds": [len(r) for r in rows], "seen": seen,
                                   "devices": jax.device_count()}}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("batching", ["unroll", "vmap", "devices"])
def test_grouped_seeds_equal_separate_runs(tmp_path, monkeypatch, batching):
    """--num_seeds 2 trains seeds 3 and 4 as one program (the tickets' steps written one
    after another, as on CPU, or vmapped, as on accelerators, or one ticket on each of
    two devices); each seed_<s> directory holds the same ticket as a run of that seed
    alone: the same masks exactly (random pruning and the 'remain' criterion make them
    independent of float rounding) and weights within the rounding tolerance of this
    computation (``_rounding_tolerance``: the largest reduction of the tiny step is a
    BatchNorm mean over 64 x 8 x 8 values). A ticket given another's batches, masks or
    keys differs by orders of magnitude more."""
    from experiments.run import seed_configs
    from rsst_jax import driver
    use_tiny_data(monkeypatch)
    kw = dict(struct="rsst", criteria="remain", prune_method="random", pruning_times=2,
              epochs=2, rate=0.5, RST_schedule="x", update_reg_interval=1,
              reg_granularity_prune=0.5)
    if batching == "devices":  # a process with two CPU devices: one ticket on each
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=2")
        script = _TWO_DEVICE_TICKETS.format(tests=str(ROOT / "tests"),
                                            save=str(tmp_path / "multi"), kw=kw)
        proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads([x for x in proc.stdout.splitlines()
                          if x.startswith("RESULT ")][-1][len("RESULT "):])
        assert out["devices"] == 2 and out["rounds"] == [2, 2]
        # every epoch trained with the ticket axis split over both devices, not replicated
        assert out["seen"] == [[2, 2, False]] * 4
    else:
        monkeypatch.setattr(train_lib, "ticket_batching", lambda platform=None: batching)
        rows = driver.run(seed_configs(tiny_config(tmp_path / "multi", seed=3, num_seeds=2,
                                                   **kw)), progress=False, log=lambda s: None)
        assert len(rows) == 2 and all(len(r) == 2 for r in rows)
    for seed in (3, 4):
        _quiet(tiny_config(tmp_path / f"single_{seed}", seed=seed, **kw))
    tol = _rounding_tolerance(tmp_path / "single_3", tmp_path / "perturbed_3",
                              lambda d: tiny_config(d, seed=3, **kw), reduction=64 * 8 * 8)
    for seed in (3, 4):
        for r in (0, 1):
            a, _ = ckpt.restore_raw(tmp_path / f"single_{seed}" / f"round_{r}" / "final")
            b, _ = ckpt.restore_raw(tmp_path / "multi" / f"seed_{seed}" / f"round_{r}" / "final")
            for x, y in zip(jax.tree_util.tree_leaves(a["masks"]),
                            jax.tree_util.tree_leaves(b["masks"])):
                np.testing.assert_array_equal(x, y)
            _assert_trees_close({"p": a["params"], "b": a["batch_stats"]},
                                {"p": b["params"], "b": b["batch_stats"]}, atol=tol[r])
    w3 = _final_tree(tmp_path / "multi" / "seed_3", 0)["params"]["conv2"]["kernel"]
    w4 = _final_tree(tmp_path / "multi" / "seed_4", 0)["params"]["conv2"]["kernel"]
    assert np.max(np.abs(w3 - w4)) > 100 * tol[0]  # independent tickets, not copies


def test_cli_num_seeds_writes_one_run_per_seed(tmp_path, monkeypatch):
    """experiments.run --num_seeds K trains K tickets as one program and writes
    SAVE_DIR/seed_<s>/."""
    from experiments import run as run_cli
    from tiny import use_tiny_data
    use_tiny_data(monkeypatch)
    rc = run_cli.main(["--dataset", "digits", "--arch", "tiny_cnn", "--save_dir", str(tmp_path),
                       "--epochs", "1", "--pruning_times", "2", "--batch_size", "64", "--lr", "0.1",
                       "--warmup", "0", "--struct", "none", "--num_seeds", "2",
                       "--eval_batch_size", "100"])
    assert rc == 0
    for s in (0, 1):
        assert len(json.loads((tmp_path / f"seed_{s}" / "summary.json").read_text())) == 2
