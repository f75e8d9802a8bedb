import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsinfra.bench.eplb import greedy_pack, greedy_rebalance_experts, greedy_replicate
from dsinfra.eplb import gpu_loads, imbalance, logical_to_physical_map, packing, rebalance_experts, replication
from dsinfra.testing import generator, skewed_loads
from tests.eplb.plans import check_plan


def loads_of(kind, num_layers, num_experts, seed):
    """Loads with ties (small integers), without (floats), skewed, or none at all."""
    gen = generator(seed)
    if kind == "integers":
        return torch.randint(0, 4, (num_layers, num_experts), generator=gen)
    if kind == "floats":
        return torch.rand(num_layers, num_experts, generator=gen, dtype=torch.float64) * 100
    if kind == "skewed":
        return skewed_loads(num_layers, num_experts, seed=seed, skew=1.5)
    return torch.zeros(num_layers, num_experts)


@st.composite
def problems(draw):
    """Random valid arguments: hierarchical and global, one or many slots per GPU."""
    num_nodes = draw(st.integers(1, 3))
    num_gpus = num_nodes * draw(st.integers(1, 3))
    num_groups = draw(st.sampled_from([num_nodes * draw(st.integers(1, 3)), draw(st.integers(1, 5))]))
    num_experts = num_groups * draw(st.integers(1, 4))
    slots_per_gpu = -(-num_experts // num_gpus) + draw(st.integers(0, 2))
    kind = draw(st.sampled_from(["integers", "floats", "skewed", "zeros"]))
    weight = loads_of(kind, draw(st.integers(1, 3)), num_experts, draw(st.integers(0, 2**16)))
    return weight, num_gpus * slots_per_gpu, num_groups, num_nodes, num_gpus


def heaviest_gpus(weight, plan, num_gpus):
    return gpu_loads(weight, plan[0], num_gpus).max(1).values


@given(problems())
def test_plans_are_valid_and_never_heavier_than_deepseeks(problem):
    weight, *args = problem
    plan = rebalance_experts(weight, *args)
    check_plan(weight, plan, *args)
    baseline = greedy_rebalance_experts(weight, *args)
    check_plan(weight, baseline, *args)
    ours, theirs = heaviest_gpus(weight, plan, args[-1]), heaviest_gpus(weight, baseline, args[-1])
    assert bool((ours <= theirs * (1 + 1e-12)).all()), (ours, theirs)


@pytest.mark.parametrize("skew", [0.3, 1.0, 2.0])
def test_never_heavier_than_deepseek_on_skewed_loads(skew):
    for seed in range(2):
        weight = skewed_loads(8, 32, seed=seed, skew=skew)
        for args in [(40, 4, 2, 8), (48, 4, 4, 8), (36, 4, 3, 12), (64, 8, 2, 16), (64, 8, 1, 32)]:
            ours = heaviest_gpus(weight, rebalance_experts(weight, *args), args[-1])
            theirs = heaviest_gpus(weight, greedy_rebalance_experts(weight, *args), args[-1])
            assert bool((ours <= theirs * (1 + 1e-12)).all()), (seed, args, ours, theirs)


@pytest.mark.parametrize(
    "num_replicas, num_groups, num_nodes, num_gpus",
    [(80, 8, 2, 8), (72, 8, 4, 8), (96, 8, 4, 16), (72, 8, 3, 12), (80, 8, 1, 10)],
    ids=["hierarchical-2-nodes", "hierarchical-4-nodes", "hierarchical-16-gpus", "global-3-nodes", "one-node"],
)
def test_better_than_deepseek_on_skewed_loads(num_replicas, num_groups, num_nodes, num_gpus):
    weight = skewed_loads(12, 64, seed=7)
    plan = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
    baseline = greedy_rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
    ours, theirs = heaviest_gpus(weight, plan, num_gpus), heaviest_gpus(weight, baseline, num_gpus)
    assert bool((ours <= theirs * (1 + 1e-12)).all())
    assert int((ours < theirs * (1 - 1e-9)).sum()) >= 6  # strictly lighter on at least half the layers
    assert imbalance(gpu_loads(weight, plan[0], num_gpus)).mean() < imbalance(gpu_loads(weight, baseline[0], num_gpus)).mean()


def test_all_zero_loads_give_an_even_plan():
    weight = torch.zeros(2, 12)
    plan = rebalance_experts(weight, 32, 4, 2, 8)
    check_plan(weight, plan, 32, 4, 2, 8)
    logcnt = plan[2]
    assert int(logcnt.max() - logcnt.min()) <= 1  # not every extra replica on expert 0, as DeepSeek's rule gives


@pytest.mark.parametrize(
    "shape, args",
    [
        ((1, 1), (1, 1, 1, 1)),
        ((1, 1), (4, 1, 1, 2)),
        ((3, 6), (6, 2, 2, 2)),
        ((2, 5), (10, 5, 5, 10)),
        ((1, 7), (7, 7, 1, 7)),
    ],
    ids=["one-expert", "one-expert-four-replicas", "no-extra-replicas", "one-slot-per-gpu", "one-gpu-per-expert"],
)
def test_edge_shapes(shape, args):
    weight = skewed_loads(*shape, seed=1)
    check_plan(weight, rebalance_experts(weight, *args), *args)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32])
def test_any_real_or_integer_dtype(dtype):
    weight = (skewed_loads(2, 16, seed=2) / 10).to(dtype)
    plan = rebalance_experts(weight, 24, 4, 2, 4)
    check_plan(weight, plan, 24, 4, 2, 4)
    assert torch.equal(plan[0], rebalance_experts(weight.double(), 24, 4, 2, 4)[0])


def test_deterministic():
    weight = skewed_loads(4, 32, seed=3)
    first, second = rebalance_experts(weight, 48, 4, 2, 8), rebalance_experts(weight.clone(), 48, 4, 2, 8)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.gpu
def test_weight_on_a_gpu():
    weight = skewed_loads(3, 32, seed=4)
    plan = rebalance_experts(weight.cuda(), 48, 4, 2, 8)
    assert plan[0].device.type == "cpu"
    assert all(torch.equal(a, b) for a, b in zip(plan, rebalance_experts(weight, 48, 4, 2, 8)))


@pytest.mark.parametrize(
    "weight, args, error, message",
    [
        (torch.ones(2, 12), (16, 5, 1, 8), ValueError, "num_logical_experts (12) must be divisible by num_groups (5)"),
        (torch.ones(2, 12), (16, 4, 3, 8), ValueError, "num_gpus (8) must be divisible by num_nodes (3)"),
        (torch.ones(2, 12), (18, 4, 2, 8), ValueError, "num_replicas (18) must be divisible by num_gpus (8)"),
        (torch.ones(2, 12), (8, 4, 2, 8), ValueError, "num_replicas (8) must be >= num_logical_experts (12)"),
        (torch.ones(12), (16, 4, 2, 8), ValueError, "weight must have 2 dimensions"),
        (torch.ones(1, 2, 12), (16, 4, 2, 8), ValueError, "weight must have 2 dimensions"),
        (torch.ones(0, 12), (16, 4, 2, 8), ValueError, "at least one layer and one expert"),
        (torch.tensor([[1.0, -2.0]]), (2, 1, 1, 1), ValueError, "weight must hold finite loads >= 0; found -2.0"),
        (torch.tensor([[1.0, float("nan")]]), (2, 1, 1, 1), ValueError, "weight must hold finite loads >= 0; found nan"),
        (torch.tensor([[1.0, float("inf")]]), (2, 1, 1, 1), ValueError, "weight must hold finite loads >= 0; found inf"),
        (torch.full((1, 2), 1e308, dtype=torch.float64), (2, 1, 1, 1), ValueError, "too large to add up in float64"),
        (torch.ones(2, 12), (16, 4, 0, 8), ValueError, "num_nodes must be > 0; got 0"),
        (torch.ones(2, 12), (16, 4, 2, 8.0), TypeError, "num_gpus must be an int; got float"),
        (torch.ones(2, 12, dtype=torch.bool), (16, 4, 2, 8), TypeError, "weight must have a real or integer dtype; got bool"),
        ([[1.0, 2.0]], (2, 1, 1, 1), TypeError, "weight must be a torch.Tensor; got list"),
    ],
)
def test_bad_input(weight, args, error, message):
    with pytest.raises(error) as raised:
        rebalance_experts(weight, *args)
    assert message in str(raised.value)


def test_logical_to_physical_map_against_a_loop():
    phy2log = torch.tensor([[2, 0, 2, 1, 2, 0], [1, 1, 1, 1, 0, 2]])
    log2phy, logcnt = logical_to_physical_map(phy2log, 4)
    expected = torch.full((2, 4, 4), -1)
    for layer, row in enumerate(phy2log.tolist()):
        for slot, expert in enumerate(row):
            expected[layer, expert, int((expected[layer, expert] >= 0).sum())] = slot
    assert torch.equal(log2phy, expected)
    assert logcnt.tolist() == [[2, 1, 3, 0], [1, 4, 1, 0]]


def test_the_baseline_makes_the_plan_of_eplbs_readme():
    """The example in DeepSeek EPLB's README and the plan it prints: the baseline
    makes it, up to the order of replicas with equal loads."""
    weight = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                           [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    published = torch.tensor([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                              [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])
    baseline = greedy_rebalance_experts(weight, 16, 4, 2, 8)[0]
    assert torch.equal(baseline[0], published[0])
    assert torch.equal(gpu_loads(weight, baseline, 8), gpu_loads(weight, published, 8))  # 2 x 86 of expert 8 and 86 of 9
    assert bool((heaviest_gpus(weight, rebalance_experts(weight, 16, 4, 2, 8), 8) <= heaviest_gpus(weight, (published,), 8)).all())


# The planner's building blocks, against the baseline's.


@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 4), st.integers(0, 2**16), st.booleans())
def test_greedy_pack_is_deepseeks(rows, num_packs, per_pack, seed, ties):
    weights = loads_of("integers" if ties else "floats", rows, num_packs * per_pack, seed).double().numpy()
    slots = packing.greedy_pack(weights, num_packs)
    assert slots.tolist() == [greedy_pack(row.tolist(), num_packs) for row in weights]


@given(st.integers(1, 4), st.integers(1, 8), st.integers(0, 12), st.integers(0, 2**16), st.booleans())
def test_greedy_replication_is_deepseeks(rows, num_experts, num_extra, seed, ties):
    loads = loads_of("integers" if ties else "floats", rows, num_experts, seed).double()
    order = replication.greedy_order(loads.numpy(), num_experts + num_extra)
    counts = replication.counts_after(order, num_experts, num_extra)
    assert counts.tolist() == greedy_replicate(loads, num_experts + num_extra).tolist()


@given(st.integers(1, 4), st.integers(1, 10), st.integers(1, 6), st.integers(0, 2**16), st.booleans())
def test_packings_are_valid_and_swaps_only_lower_the_heaviest(rows, num_packs, per_pack, seed, ties):
    weights = loads_of("integers" if ties else "floats", rows, num_packs * per_pack, seed).double().numpy()
    for slots in (packing.greedy_pack(weights, num_packs), packing.round_pack(weights, num_packs)):
        assert (np.sort(slots.reshape(rows, -1), axis=1) == np.arange(num_packs * per_pack)).all()
        before = packing.pack_loads(weights, slots).max(1)
        improved = packing.improve_packing(weights, slots.copy(), np.zeros(rows))
        assert (np.sort(improved.reshape(rows, -1), axis=1) == np.arange(num_packs * per_pack)).all()
        assert (packing.pack_loads(weights, improved).max(1) <= before).all()


def test_swaps_reach_a_balanced_packing():
    weights = np.array([[9.0, 8, 7, 6, 5, 4, 3, 2]])  # greedy: {9, 6, 5, 2} = 22, {8, 7, 4, 3} = 22; start badly instead
    slots = np.array([[[0, 1, 2, 3], [4, 5, 6, 7]]])
    improved = packing.improve_packing(weights, slots, np.zeros(1))
    assert packing.pack_loads(weights, improved).tolist() == [[22.0, 22.0]]


def test_candidate_counts():
    loads = np.array([[10.0, 1.0, 4.0, 2.0]])
    order = replication.greedy_order(loads, 9)  # loads per replica 10, 5, 4 (expert 2), 3.3, 2.5
    assert order.tolist() == [[0, 0, 2, 0, 0]]
    candidates = replication.candidate_counts(loads, order, [0, 2, 5])
    # after the stop, one each to the lightest experts (1.0, 2.0, 4.0, 10.0), wrapping round
    assert candidates.tolist() == [[[2, 3, 2, 2]], [[3, 2, 2, 2]], [[5, 1, 2, 1]]]
    assert replication.stopping_points(3) == [0, 1, 2, 3]
    assert replication.stopping_points(64)[-1] == 64 and len(replication.stopping_points(64)) == replication.MAX_CANDIDATES
