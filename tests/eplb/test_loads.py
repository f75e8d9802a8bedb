"""gpu_loads, slot_loads and in_order_gpu_loads: checked arguments."""

import pytest
import torch

from dsinfra.eplb import gpu_loads, in_order_gpu_loads, rebalance_experts, slot_loads


def test_gpu_loads_sums_each_gpus_slots():
    weight = torch.tensor([[4.0, 2.0, 1.0, 1.0]])
    phy2log = torch.tensor([[0, 0, 1, 2, 3, 1]])
    assert gpu_loads(weight, phy2log, 3).tolist() == [[4.0, 2.0, 2.0]]
    assert gpu_loads(weight, phy2log, 2).tolist() == [[5.0, 3.0]]


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda w, p: gpu_loads(w, p, 3), ValueError, r"the slots per layer of phy2log \(8\) must be divisible by num_gpus \(3\)"),
        (lambda w, p: gpu_loads(w, p, 0), ValueError, "num_gpus must be > 0"),
        (lambda w, p: gpu_loads(w, p + 4, 2), ValueError, r"phy2log must hold values in \[0, 4\); found 7"),
        (lambda w, p: gpu_loads(w, p.int(), 2), TypeError, "phy2log must have dtype int64"),
        (lambda w, p: slot_loads(w[:1], p), ValueError, "phy2log must have shape"),
        (lambda w, p: slot_loads(w[0], p), ValueError, "weight must have 2 dimensions"),
        (lambda w, p: in_order_gpu_loads(w, 0), ValueError, "num_gpus must be > 0"),
    ],
)
def test_bad_arguments_name_themselves(call, error, message):
    weight = torch.rand(2, 4, dtype=torch.float64)
    phy2log = rebalance_experts(weight, 8, 1, 1, 2)[0]
    with pytest.raises(error, match=message):
        call(weight, phy2log)
