import pytest
import torch

from dsinfra.eplb import rebalance_experts, route_to_replicas
from dsinfra.testing import skewed_loads, topk_indices

NUM_EXPERTS = 16
PLAN = rebalance_experts(skewed_loads(2, NUM_EXPERTS, seed=5, skew=1.5), 32, 4, 2, 8)


def check_routes(topk_idx, slots, layer):
    phy2log, _, logcnt = (t[layer] for t in PLAN)
    assert slots.shape == topk_idx.shape and slots.dtype == torch.int64
    dropped = topk_idx == -1
    assert torch.equal(slots == -1, dropped)
    assert torch.equal(phy2log[slots[~dropped]], topk_idx[~dropped].long())  # each slot holds the chosen expert
    tokens_per_slot = torch.bincount(slots[~dropped], minlength=phy2log.numel())
    for expert in range(NUM_EXPERTS):
        shares = tokens_per_slot[phy2log == expert]
        assert len(shares) == int(logcnt[expert])
        assert int(shares.max() - shares.min()) <= 1  # spread evenly over the replicas


@pytest.mark.parametrize(
    "num_tokens, drop, dtype", [(0, 0.0, torch.int64), (1, 0.0, torch.int64), (57, 0.3, torch.int64), (200, 0.1, torch.int32)]
)
@pytest.mark.parametrize("layer", [0, 1])
def test_routes_spread_over_replicas(num_tokens, drop, dtype, layer):
    topk_idx = topk_indices(num_tokens, NUM_EXPERTS, 4, seed=num_tokens + layer, skew=1.0, drop=drop).to(dtype)
    slots = route_to_replicas(topk_idx, PLAN[1][layer], PLAN[2][layer])
    check_routes(topk_idx, slots, layer)


def test_offset_rotates_the_replicas():
    _, log2phy, logcnt = (t[0] for t in PLAN)
    expert = int(logcnt.argmax())
    count = int(logcnt[expert])
    assert count >= 2
    topk_idx = torch.tensor([[expert]])
    slots = [int(route_to_replicas(topk_idx, log2phy, logcnt, offset=offset)) for offset in range(2 * count)]
    assert slots == log2phy[expert, :count].tolist() * 2


@pytest.mark.gpu
def test_routes_on_a_gpu():
    topk_idx = topk_indices(100, NUM_EXPERTS, 4, seed=1, skew=1.0, drop=0.1)
    slots = route_to_replicas(topk_idx.cuda(), PLAN[1][0].cuda(), PLAN[2][0].cuda())
    assert torch.equal(slots.cpu(), route_to_replicas(topk_idx, PLAN[1][0], PLAN[2][0]))


@pytest.mark.parametrize(
    "topk_idx, log2phy, logcnt, offset, error, message",
    [
        (torch.full((2, 2), 16), PLAN[1][0], PLAN[2][0], 0, ValueError, "topk_idx must hold values in [0, 16) or -1; found 16"),
        (torch.zeros(2, 2), PLAN[1][0], PLAN[2][0], 0, TypeError, "topk_idx must have dtype int32 or int64"),
        (torch.zeros(2, 2, dtype=torch.int64), PLAN[1], PLAN[2][0], 0, ValueError, "log2phy must have 2 dimensions"),
        (torch.zeros(2, 2, dtype=torch.int64), PLAN[1][0], PLAN[2][0][:-1], 0, ValueError, "logcnt must have shape [16]"),
        (torch.zeros(2, 2, dtype=torch.int64), PLAN[1][0], PLAN[2][0] * 0, 0, ValueError, "logcnt must hold values in [1,"),
        (torch.zeros(2, 2, dtype=torch.int64), PLAN[1][0], PLAN[2][0], 0.5, TypeError, "offset must be an int; got float"),
    ],
)
def test_bad_input(topk_idx, log2phy, logcnt, offset, error, message):
    with pytest.raises(error) as raised:
        route_to_replicas(topk_idx, log2phy, logcnt, offset)
    assert message in str(raised.value)
