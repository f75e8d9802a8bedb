import pytest
import torch

from dsinfra.eplb import ExpertLoadRecorder, rebalance_experts
from dsinfra.testing import spawn, topk_indices

NUM_LAYERS, NUM_EXPERTS = 3, 8


def routing(step, layer, rank=0, device="cpu"):
    """A batch's routing decisions: skewed, with dropped (-1) entries."""
    return topk_indices(24, NUM_EXPERTS, 2, seed=1000 * rank + 10 * step + layer, skew=1.0, drop=0.2, device=device)


def counts(topk_idx):
    """Tokens per expert, counted one by one."""
    result = torch.zeros(NUM_EXPERTS, dtype=torch.float64)
    for expert in topk_idx.flatten().tolist():
        if expert >= 0:
            result[expert] += 1
    return result


def record_steps(recorder, num_steps, rank=0, device="cpu"):
    """Record ``num_steps`` steps (layer 1 twice per step, in two halves) and
    return every step's expected counts: [steps, layers, experts]."""
    expected = torch.zeros(num_steps, NUM_LAYERS, NUM_EXPERTS, dtype=torch.float64)
    for step in range(num_steps):
        for layer in range(NUM_LAYERS):
            topk_idx = routing(step, layer, rank, device)
            if layer == 1:  # two micro-batches in one step add up
                recorder.record(layer, topk_idx[:10])
                recorder.record(layer, topk_idx[10:].to(torch.int32))
            else:
                recorder.record(layer, topk_idx)
            expected[step, layer] = counts(topk_idx.cpu())
        recorder.step()
    return expected


@pytest.mark.parametrize("window", [1, 3, 10])
def test_sliding_window(window):
    recorder = ExpertLoadRecorder(NUM_LAYERS, NUM_EXPERTS, window=window)
    assert torch.equal(recorder.weight(), torch.zeros(NUM_LAYERS, NUM_EXPERTS, dtype=torch.float64))
    expected = record_steps(recorder, 5)
    assert recorder.steps == 5
    assert torch.equal(recorder.weight(), expected[-window:].sum(0))
    recorder.record(0, routing(9, 0))  # an open step does not count until step()
    assert torch.equal(recorder.weight(), expected[-window:].sum(0))


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9])
def test_exponential_moving_average(decay):
    recorder = ExpertLoadRecorder(NUM_LAYERS, NUM_EXPERTS, decay=decay)
    expected_steps = record_steps(recorder, 4)
    expected = torch.zeros(NUM_LAYERS, NUM_EXPERTS, dtype=torch.float64)
    for step_counts in expected_steps:
        expected = decay * expected + (1 - decay) * step_counts
    torch.testing.assert_close(recorder.weight(), expected)


def test_reset_and_rebalance():
    recorder = ExpertLoadRecorder(NUM_LAYERS, NUM_EXPERTS, window=2)
    record_steps(recorder, 3)
    plan = recorder.rebalance(12, 4, 2, 4)
    assert all(torch.equal(a, b) for a, b in zip(plan, rebalance_experts(recorder.weight(), 12, 4, 2, 4)))
    recorder.reset()
    assert recorder.steps == 0 and not recorder.weight().any()


@pytest.mark.gpu
def test_records_on_a_gpu():
    recorder = ExpertLoadRecorder(NUM_LAYERS, NUM_EXPERTS, decay=0.5, device="cuda")
    expected = record_steps(recorder, 2, device="cuda")
    assert recorder.weight().device.type == "cuda"
    torch.testing.assert_close(recorder.weight().cpu(), 0.25 * expected[0] + 0.5 * expected[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "give exactly one of window"),
        ({"window": 4, "decay": 0.5}, "give exactly one of window"),
        ({"window": 0}, "window must be > 0"),
        ({"decay": 1.0}, "decay must be a number in [0, 1)"),
        ({"decay": -0.1}, "decay must be a number in [0, 1)"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError) as raised:
        ExpertLoadRecorder(NUM_LAYERS, NUM_EXPERTS, **kwargs)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    "layer, topk_idx, error, message",
    [
        (3, torch.zeros(2, 2, dtype=torch.int64), ValueError, "layer must be an int in [0, 3); got 3"),
        (-1, torch.zeros(2, 2, dtype=torch.int64), ValueError, "layer must be an int in [0, 3); got -1"),
        (0, torch.full((2, 2), 8), ValueError, "topk_idx must hold values in [0, 8) or -1; found 8"),
        (0, torch.full((2, 2), -2), ValueError, "topk_idx must hold values in [0, 8) or -1; found -2"),
        (0, torch.zeros(2, 2), TypeError, "topk_idx must have dtype int32 or int64; got float32"),
        (0, torch.zeros(2, 2, dtype=torch.int64, device="meta"), ValueError, "topk_idx must be on cpu"),
    ],
)
def test_bad_records(layer, topk_idx, error, message):
    recorder = ExpertLoadRecorder(NUM_LAYERS, NUM_EXPERTS, window=2)
    with pytest.raises(error) as raised:
        recorder.record(layer, topk_idx)
    assert message in str(raised.value)


def _record_and_reduce(rank, world_size, group):
    recorder = ExpertLoadRecorder(NUM_LAYERS, NUM_EXPERTS, window=2)
    expected = record_steps(recorder, 3, rank=rank)
    local = recorder.weight()
    summed = recorder.weight(group)
    plan = recorder.rebalance(12, 4, 2, 4, group=group)
    return local, summed, expected[-2:].sum(0), plan


def test_all_reduce_over_two_ranks():
    results = spawn(_record_and_reduce, 2, timeout=60)
    (local0, summed0, expected0, plan0), (local1, summed1, expected1, plan1) = results
    assert torch.equal(local0, expected0) and torch.equal(local1, expected1)
    assert not torch.equal(local0, local1)
    assert torch.equal(summed0, expected0 + expected1) and torch.equal(summed1, summed0)
    assert all(torch.equal(a, b) for a, b in zip(plan0, plan1))  # every rank gets the same plan
