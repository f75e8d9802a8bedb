"""deep_ep.utils: the helpers DeepEP's current tests import, against direct formulas."""

import multiprocessing
import os
import random

import pytest
import torch

from dsinfra.conformance.runner import free_port
from dsinfra.deep_ep.utils import envs, math, testing
from dsinfra.deep_gemm.ue8m0 import ceil_to_ue8m0, pack_ue8m0_to_int


def test_calc_diff_is_deepeps_offset_measure():
    x, y = torch.randn(64, 32), torch.randn(64, 32)
    a, b = x.double() + 1, y.double() + 1
    expected = float(1 - 2 * (a * b).sum() / (a * a + b * b).sum())
    assert math.calc_diff(x, y) == pytest.approx(expected, rel=1e-12)
    assert math.calc_diff(x, x) == 0 and math.calc_diff(torch.zeros(3), torch.zeros(3)) == 0


def test_safe_div():
    assert math.safe_div(3, 2) == 1.5 and math.safe_div(0, 0) == 0
    with pytest.raises(ZeroDivisionError):
        math.safe_div(1, 0)


@pytest.mark.parametrize("num_slots, width", [(8, 5), (3, 6), (1, 1)])
def test_inplace_unique_keeps_the_distinct_ids_descending(num_slots, width):
    rng = random.Random(num_slots * 10 + width)
    rows = [[rng.choice([-1, *range(num_slots)]) for _ in range(width)] for _ in range(40)]
    x = torch.tensor(rows)
    math.inplace_unique(x, num_slots)
    for row, got in zip(rows, x.tolist()):
        distinct = sorted({v for v in row if v >= 0}, reverse=True)[: min(num_slots, width)]
        assert got == distinct + [-1] * (width - len(distinct))


def test_create_grouped_scores_zeroes_the_other_groups():
    scores = torch.rand(10, 12) + 0.5
    groups = torch.tensor([[0, 2]] * 5 + [[3, 1]] * 5)
    out = math.create_grouped_scores(scores, groups, num_groups=4)
    for t in range(10):
        for e in range(12):
            kept = e // 3 in groups[t].tolist()
            assert out[t, e] == (scores[t, e] if kept else 0)


def test_per_token_cast_back_reads_float_and_packed_ue8m0_scales():
    x = torch.randn(16, 512) * 3
    x_fp8, scales = math.per_token_cast_to_fp8(x)
    back = math.per_token_cast_back(x_fp8, scales)
    assert back.dtype == torch.bfloat16 and back.shape == x.shape
    assert math.calc_diff(back.float(), x) < 1e-3
    powers = ceil_to_ue8m0(scales)  # power-of-two scales, packed four to an int32 as low-latency dispatch delivers them
    packed = pack_ue8m0_to_int(powers)
    assert torch.equal(math.per_token_cast_back(x_fp8, packed), math.per_token_cast_back(x_fp8, powers))
    # DeepEP's test views packed scales [experts, tokens, hidden / 512] as [-1, hidden / 128]: same scales, row order
    assert torch.equal(math.per_token_cast_back(x_fp8, packed.view(-1, 4)), math.per_token_cast_back(x_fp8, powers))
    assert math.per_token_cast_back(x_fp8[:0], scales[:0]).shape == (0, 512)
    with pytest.raises(ValueError, match="16 x 4 scales"):
        math.per_token_cast_back(x_fp8, scales[:8])


def test_hashes_move_with_any_bit():
    t = torch.randn(4, 8).to(torch.bfloat16)
    flipped = t.clone()
    flipped.view(torch.int16)[1, 3] ^= 1
    assert math.hash_tensor(t) != math.hash_tensor(flipped)
    assert math.hash_tensors(t, [None, flipped]) == math.hash_tensor(t) ^ math.hash_tensor(flipped)
    assert math.count_bytes(t, (t.float(), None)) == 64 + 128


def test_timers_return_deepeps_shapes():
    calls = []
    mean, low, high = testing.bench(lambda: calls.append("fn"), num_warmups=2, num_tests=5, post_fn=lambda: calls.append("post"))
    assert calls.count("fn") == 7 and calls.count("post") == 5
    assert 0 <= low <= mean <= high
    assert len(testing.bench_kineto(lambda: None, ("dispatch", "combine"), num_tests=3)) == 2
    assert testing.bench_kineto(lambda: None, "dispatch", num_tests=3) >= 0
    # a send and a receive half per call: a list of two parts per kernel, as DeepEP's test reads them
    dispatch_t, combine_t = testing.kernel_times(0.5, ("dispatch", "combine"), num_kernels_per_period=2)
    assert dispatch_t == combine_t == [0.25, 0.25]
    assert len(testing.bench_kineto(lambda: None, ("dispatch",), num_tests=2, num_kernels_per_period=2)[0]) == 2


def _rank(local_rank, num_local_ranks, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rank, world_size, group = envs.init_dist(local_rank, num_local_ranks, seed=7)
    sums = torch.tensor([float(rank)], dtype=torch.float32)
    torch.distributed.all_reduce(sums, group=group)
    envs.dist_print(f"rank {rank}", once_in_node=True)
    queue.put((rank, world_size, float(sums), torch.get_default_dtype(), envs.get_local_seed(), envs.get_global_seed()))
    torch.distributed.destroy_process_group()


def test_init_dist_joins_every_rank():
    context = multiprocessing.get_context("spawn")
    queue, port = context.Queue(), free_port()
    processes = [context.Process(target=_rank, args=(r, 2, port, queue)) for r in range(2)]
    for process in processes:
        process.start()
    results = sorted(queue.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert results == [(0, 2, 1.0, torch.bfloat16, 7, 7), (1, 2, 1.0, torch.bfloat16, 8, 7)]
