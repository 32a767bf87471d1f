"""Knowledge distillation from the dense round-0 network."""
import json

import numpy as np
import pytest

from rsst_jax import train

from tiny import quiet_run, tiny_config, use_tiny_data


def test_distillation_loss_matches_numpy_kl_times_t_squared():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    temp = 3.0

    def softmax(z):
        z = z - z.max(-1, keepdims=True)
        return np.exp(z) / np.exp(z).sum(-1, keepdims=True)

    p, q = softmax(t / temp), softmax(s / temp)
    expected = temp ** 2 * np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))
    got = float(train.distillation_loss(s.astype(np.float32), t.astype(np.float32), temp))
    assert got == pytest.approx(expected, rel=1e-5)
    assert float(train.distillation_loss(t, t, temp)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_distill_run_uses_round0_teacher_and_changes_later_rounds(tmp_path, monkeypatch):
    use_tiny_data(monkeypatch)
    kw = dict(struct="none", pruning_times=2, epochs=1)
    quiet_run(tiny_config(tmp_path / "plain", **kw))
    run = quiet_run(tiny_config(tmp_path / "kd", distill=True, kd_alpha=0.9, **kw))[1]
    plain = [json.loads(x) for x in (tmp_path / "plain" / "log.jsonl").read_text().splitlines()]
    kd = [json.loads(x) for x in (tmp_path / "kd" / "log.jsonl").read_text().splitlines()]
    # Round 0 is identical (alpha 0 there); round 1 trains against the teacher.
    assert plain[0]["train_loss"] == pytest.approx(kd[0]["train_loss"], rel=1e-6)
    assert plain[1]["train_loss"] != pytest.approx(kd[1]["train_loss"], rel=1e-3)
    assert run.teacher is not None
    assert run.engine.step_traces == 1
