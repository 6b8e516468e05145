from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest

from ckptreg import weights as W
from ckptreg.errors import SelectionError, WeightError
from helpers_ref import ref_mwa_weights


@dataclass
class FakeCkpt:
    step: int | None
    metrics: dict = field(default_factory=dict)
    run: str = "run"

    @property
    def ref(self):
        return f"{self.run}@{self.step}"


def test_worked_example_from_methods_md():
    w = W.mwa([0.50, 0.40, 0.45], [100, 200, 300], penalty=0.7, power=2, direction="min")
    assert W.positions([0.50, 0.40, 0.45], [100, 200, 300], "min") == [2, 0, 1]
    assert [round(x, 4) for x in w] == [0.1447, 0.5273, 0.3281]
    assert math.isclose(sum(w), 1.0, rel_tol=0, abs_tol=1e-15)


def test_worked_example_through_checkpoints_and_default_power():
    ck = [FakeCkpt(100, {"loss": 0.50}), FakeCkpt(200, {"loss": 0.40}), FakeCkpt(300, {"loss": 0.45})]
    w = W.for_checkpoints(ck, "mwa", metric="loss", penalty=0.7)
    assert W.DEFAULT_POWER == 2.0
    assert [round(x, 4) for x in w] == [0.1447, 0.5273, 0.3281]


@pytest.mark.parametrize("seed", range(20))
def test_mwa_matches_reference(seed):
    r = random.Random(seed)
    n = r.randint(1, 8)  # p=1.05, q=3 overflows the plain-float reference beyond 8
    direction = r.choice(["min", "max"])
    vals = [round(r.uniform(0.1, 3.0), r.choice([1, 2, 6])) for _ in range(n)]  # some ties
    steps = r.sample(range(1, 1000), n)
    p = r.choice([0.5, 0.7, 0.9, 1.0, 1.05])
    q = r.choice([1.0, 1.5, 2.0, 3.0])
    got = W.mwa(vals, steps, penalty=p, power=q, direction=direction)
    ref = ref_mwa_weights(vals, steps, p, q, direction)
    for a, b in zip(got, ref):
        assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300)


def test_q_one_is_basic_weighting():
    vals = [0.3, 0.9, 0.5, 0.7]
    for direction in ("min", "max"):
        a = W.mwa(vals, [1, 2, 3, 4], penalty=0.6, power=1.0, direction=direction)
        b = W.metric_weights(vals, direction)
        assert all(math.isclose(x, y, rel_tol=1e-12) for x, y in zip(a, b))


def test_basic_weighting():
    assert W.metric_weights([1.0, 2.0], "min") == pytest.approx([2 / 3, 1 / 3])
    assert W.metric_weights([1.0, 3.0], "max") == pytest.approx([0.25, 0.75])
    assert W.uniform(4) == [0.25] * 4


def test_ties_rank_later_step_first():
    # equal losses: the later step gets position 0
    assert W.positions([0.5, 0.5, 0.4], [10, 20, 30], "min") == [2, 1, 0]
    w = W.mwa([0.5, 0.5], [10, 20], penalty=0.5, power=2)
    assert w[1] > w[0]
    # input order does not matter, only steps
    assert W.positions([0.5, 0.5], [20, 10], "min") == [0, 1]


def test_steps_metric_reads_step_and_maximises():
    ck = [FakeCkpt(s, {}) for s in (100, 200, 300)]
    w = W.for_checkpoints(ck, "mwa", metric="step", penalty=0.7)
    ref = ref_mwa_weights([100, 200, 300], [100, 200, 300], 0.7, 2.0, "max")
    assert w == pytest.approx(ref, rel=1e-12)
    assert w[2] > w[1] > w[0]
    assert W.for_checkpoints(ck, "metric", metric="global_step") == pytest.approx([1 / 6, 2 / 6, 3 / 6])


def test_extreme_penalty_no_nan():
    w = W.mwa([0.5] * 60, list(range(60)), penalty=0.01, power=3)
    assert all(math.isfinite(x) for x in w) and math.isclose(sum(w), 1.0)
    assert w[-1] > 0.99


@pytest.mark.parametrize("name,direction", [
    ("loss", "min"), ("eval_loss", "min"), ("train/loss", "min"), ("ppl", "min"), ("perplexity", "min"),
    ("wer", "min"), ("error_rate", "min"), ("step", "max"), ("steps", "max"), ("global_step", "max"),
    ("accuracy", "max"), ("gsm8k_acc", "max"), ("exact_match", "max"), ("em", "max"), ("f1", "max"),
    ("bleu", "max"), ("rouge_l", "max"), ("reward", "max"), ("win_rate", "max"), ("score", "max"),
    ("reward_loss", "min"), ("something_unknown", "min"),
])
def test_default_direction(name, direction):
    assert W.default_direction(name) == direction


def test_for_checkpoints_direction_override_and_schemes():
    ck = [FakeCkpt(1, {"acc": 0.2}), FakeCkpt(2, {"acc": 0.6})]
    assert W.for_checkpoints(ck, "metric", metric="acc") == pytest.approx([0.25, 0.75])
    assert W.for_checkpoints(ck, "metric", metric="acc", direction="min") == pytest.approx([0.75, 0.25])
    assert W.for_checkpoints(ck, "unweighted") == [0.5, 0.5]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_bad_metric_value_names_checkpoint_and_value(bad):
    ck = [FakeCkpt(10, {"loss": 0.5}), FakeCkpt(20, {"loss": bad})]
    with pytest.raises(WeightError) as e:
        W.for_checkpoints(ck, "mwa", metric="loss", penalty=0.7)
    assert "run@20" in str(e.value) and repr(bad) in str(e.value)
    with pytest.raises(WeightError):
        W.for_checkpoints(ck, "metric", metric="loss")


def test_missing_metric_names_checkpoint():
    ck = [FakeCkpt(10, {"loss": 0.5}), FakeCkpt(20, {"acc": 0.5})]
    with pytest.raises(WeightError, match=r"run@20.*'loss' missing"):
        W.for_checkpoints(ck, "metric", metric="loss")
    with pytest.raises(WeightError, match="no step"):
        W.for_checkpoints([FakeCkpt(None, {})], "metric", metric="step")


@pytest.mark.parametrize("p", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_penalty(p):
    with pytest.raises(WeightError, match="penalty"):
        W.mwa([0.5, 0.4], [1, 2], penalty=p)


@pytest.mark.parametrize("q", [0.5, 0.999, float("nan")])
def test_bad_power(q):
    with pytest.raises(WeightError, match="power"):
        W.mwa([0.5, 0.4], [1, 2], penalty=0.7, power=q)


def test_other_errors():
    with pytest.raises(WeightError, match="needs a penalty"):
        W.for_checkpoints([FakeCkpt(1, {"loss": 1.0})], "mwa", metric="loss")
    with pytest.raises(WeightError, match="unknown weighting scheme"):
        W.for_checkpoints([FakeCkpt(1, {"loss": 1.0})], "fancy", metric="loss")
    with pytest.raises(WeightError, match="needs a metric"):
        W.for_checkpoints([FakeCkpt(1, {"loss": 1.0})], "mwa", penalty=0.5)
    with pytest.raises(WeightError):
        W.for_checkpoints([], "uniform")
    with pytest.raises(WeightError, match="direction"):
        W.mwa([1.0], [1], penalty=0.5, direction="up")


def test_rescale_mean_one():
    w = W.rescale_mean_one([0.1447, 0.5273, 0.3281])
    assert math.isclose(sum(w), 3.0)
    assert w[1] / w[0] == pytest.approx(0.5273 / 0.1447)
    with pytest.raises(WeightError):
        W.rescale_mean_one([0.0, 0.0])
    with pytest.raises(WeightError):
        W.rescale_mean_one([float("nan"), 1.0])


def test_select_indices():
    # steps 50..90 ascending -> indices 0..4; last 3 every 2 = 90, 70, 50
    assert W.select_indices(5, 3, 2) == [0, 2, 4]
    assert W.select_indices(5, 2) == [3, 4]
    with pytest.raises(SelectionError, match="only 4 exist"):
        W.select_indices(4, 3, 2)
