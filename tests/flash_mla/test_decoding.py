"""Every implementation against the reference, through the public API, with
FlashMLA's bound: cos-diff (calc_diff) < 1e-5 on out and lse."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsinfra import flash_mla
from dsinfra.flash_mla import metadata, reference
from dsinfra.testing import seq_lengths

from .checks import BOUND, assert_matches
from .inputs import paged_inputs, sparse_indices

# On a handful of output values the bf16 rounding of the probabilities (FlashMLA
# rounds them too) does not average out: tiny random problems get a looser bound.
SMALL_PROBLEM_BOUND = 5e-5


def plan_for(inputs, *, topk=None, parts=None):
    """get_mla_metadata's plan, or one spread over ``parts`` to force many splits."""
    batch, seq_len_q, num_heads_q, _ = inputs.q.shape
    num_heads_k = inputs.k_cache.shape[2]
    if parts is not None:
        lengths = inputs.cache_seqlens if topk is None else torch.full((batch * seq_len_q,), topk)
        return metadata.plan_splits(lengths.to(inputs.q.device), parts)
    return flash_mla.get_mla_metadata(
        inputs.cache_seqlens, seq_len_q * num_heads_q // num_heads_k, num_heads_k, num_heads_q, topk=topk
    )


def moved(inputs, device):
    for field in ("q", "k_cache", "block_table", "cache_seqlens"):
        setattr(inputs, field, getattr(inputs, field).to(device))
    return inputs


def check_against_reference(inputs, *, causal=False, indices=None, fp8=False, parts=None, plan=None, bound=BOUND):
    k_cache = flash_mla.quantize_k_cache(inputs.k_cache, inputs.head_dim_v) if fp8 else inputs.k_cache
    topk = None if indices is None else indices.shape[-1]
    plan = plan_for(inputs, topk=topk, parts=parts) if plan is None else plan
    args = (inputs.q, k_cache, inputs.block_table, inputs.cache_seqlens, inputs.head_dim_v, *plan)
    out, lse = flash_mla.flash_mla_with_kvcache(*args, causal=causal, is_fp8_kvcache=fp8, indices=indices)
    cpu = [x.cpu() if isinstance(x, torch.Tensor) else x for x in args]
    expected_out, expected_lse = reference.flash_mla_with_kvcache(
        *cpu, inputs.q.shape[-1] ** -0.5, causal, fp8, None if indices is None else indices.cpu()
    )
    assert_matches(out, lse, expected_out, expected_lse, bound=bound)


# (lengths, num_heads_q, num_heads_k, seq_len_q, head_dim, head_dim_v, page_block_size, dtype, q_scale)
CPU_CASES = [
    ([1], 16, 1, 1, 576, 512, 64, torch.bfloat16, 1.0),
    ([2000], 128, 1, 2, 576, 512, 64, torch.bfloat16, 1.0),
    ([63, 64, 65, 1, 130], 32, 1, 2, 576, 512, 64, torch.float16, 1.0),
    (seq_lengths(16, 300, seed=0).tolist(), 64, 1, 1, 576, 512, 64, torch.bfloat16, 3.0),
    (seq_lengths(8, 1000, seed=1).tolist(), 128, 1, 1, 576, 512, 16, torch.bfloat16, 1.0),
    ([5, 100, 17], 16, 1, 2, 64, 64, 16, torch.bfloat16, 1.0),
    ([40, 33, 0], 32, 2, 2, 192, 128, 32, torch.bfloat16, 1.0),
    ([200, 7], 16, 1, 2, 160, 128, 128, torch.float16, 1.0),
]


@pytest.fixture
def backend_torch(monkeypatch):
    monkeypatch.setenv("DSINFRA_BACKEND", "torch")


@pytest.fixture
def backend_triton(monkeypatch, kernel_device):
    monkeypatch.setenv("DSINFRA_BACKEND", "triton")
    return kernel_device


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda case: f"b{len(case[0])}-h{case[1]}x{case[2]}-s{case[3]}-d{case[4]}")
def test_torch_dense(backend_torch, case, causal):
    lengths, heads_q, heads_k, seq_len_q, head_dim, head_dim_v, page, dtype, q_scale = case
    inputs = paged_inputs(lengths, num_heads_q=heads_q, num_heads_k=heads_k, seq_len_q=seq_len_q, head_dim=head_dim,
                          head_dim_v=head_dim_v, page_block_size=page, dtype=dtype, q_scale=q_scale)
    check_against_reference(inputs, causal=causal)


@pytest.mark.parametrize("wave_tokens, page", [(96, 16), (100, 16), (12, 16)], ids=["whole-blocks", "wave-not-a-multiple", "wave-below-a-block"])
def test_torch_many_waves(backend_torch, monkeypatch, wave_tokens, page):
    """Sequences longer than a wave are cut into pieces and merged again; a wave
    reads whole blocks, or single slots when a block is longer than a wave."""
    from dsinfra.flash_mla import torch_impl

    monkeypatch.setattr(torch_impl, "MAX_WAVE_TOKENS", wave_tokens)
    inputs = paged_inputs([300, 1, 95, 97, 0, 250], num_heads_q=16, seq_len_q=2, head_dim=64, head_dim_v=64, page_block_size=page)
    check_against_reference(inputs, causal=True)
    inputs = paged_inputs([98, 5], num_heads_q=16, head_dim=64, head_dim_v=64, page_block_size=page)  # 98: two pieces
    check_against_reference(inputs)
    inputs = paged_inputs([90, 5], num_heads_q=16, head_dim=64, head_dim_v=64, page_block_size=page)  # two waves, in order
    check_against_reference(inputs)


def test_torch_plan_waves():
    """Waves pad to whole blocks; one wave of one piece per sequence keeps the sequences' order."""
    from dsinfra.flash_mla.torch_impl import plan_waves

    assert plan_waves([70, 5, 100], 512, 64) == ([(0, 3, 128)], [0, 1, 2], [0, 0, 0])
    assert plan_waves([70, 5, 130], 256, 64) == ([(0, 1, 192), (1, 3, 128)], [2, 0, 1], [0, 0, 0])
    assert plan_waves([300, 5, 0, 200], 256, 64) == ([(0, 1, 256), (1, 2, 256), (2, 4, 64)], [0, 3, 0, 1], [0, 0, 256, 0])
    assert plan_waves([3, 9], 8) == ([(0, 1, 8), (1, 3, 3)], [1, 0, 1], [0, 0, 8])


@pytest.mark.parametrize("native, fp8", [(False, False), (False, True), (True, False)],
                         ids=["float32-pv", "float32-pv-fp8", "low-precision-pv"])
def test_torch_both_ways_to_multiply_by_v(backend_torch, monkeypatch, native, fp8):
    """The CPU path multiplies the probabilities by V in float32, or in q's dtype
    where the CPU does that natively; each way over pieces, merges, rows that see
    nothing, a peaked softmax, the FP8 cache and sparse indices."""
    from dsinfra import backend
    from dsinfra.flash_mla import torch_impl

    monkeypatch.setattr(backend, "native_cpu_matmul", lambda dtype: native)
    monkeypatch.setattr(torch_impl, "MAX_WAVE_TOKENS", 96)
    inputs = paged_inputs([300, 1, 95, 0, 250], num_heads_q=64, seq_len_q=2, head_dim=64, head_dim_v=64,
                          page_block_size=16, q_scale=3.0)
    check_against_reference(inputs, causal=True)
    inputs = paged_inputs([130, 1, 64], num_heads_q=16, seq_len_q=2)
    check_against_reference(inputs, causal=True, fp8=fp8)
    check_against_reference(inputs, indices=sparse_indices(inputs, 2, 96), fp8=fp8)


@pytest.mark.parametrize("fp8", [False, True])
def test_torch_sparse(backend_torch, fp8):
    inputs = paged_inputs(seq_lengths(6, 200, seed=2).tolist(), num_heads_q=64, seq_len_q=2)
    check_against_reference(inputs, indices=sparse_indices(inputs, 2, 96), fp8=fp8)


def test_torch_fp8_dense(backend_torch):
    inputs = paged_inputs([130, 1, 64], num_heads_q=128, seq_len_q=2)
    check_against_reference(inputs, causal=True, fp8=True)


# The interpreter is slow: small shapes, yet every path (splits, FP8, sparse, causal, several KV heads).
@pytest.mark.parametrize(
    "case",
    [
        dict(lengths=[1, 70, 130], heads_q=16, heads_k=1, seq_len_q=2, head_dim=64, head_dim_v=64, page=16, causal=True, parts=8),
        dict(lengths=[300], heads_q=16, heads_k=1, seq_len_q=1, head_dim=576, head_dim_v=512, page=64, causal=False, parts=4),
        dict(lengths=[0, 45], heads_q=32, heads_k=2, seq_len_q=1, head_dim=192, head_dim_v=128, page=32, causal=False, parts=None),
        dict(lengths=[33, 17], heads_q=16, heads_k=1, seq_len_q=2, head_dim=160, head_dim_v=128, page=16, causal=True, parts=None,
             dtype=torch.float16),
    ],
    ids=["64-splits-causal", "576-splits", "192-two-kv-heads", "160-fp16-causal"],
)
def test_triton_dense(backend_triton, case):
    inputs = moved(paged_inputs(case["lengths"], num_heads_q=case["heads_q"], num_heads_k=case["heads_k"],
                                seq_len_q=case["seq_len_q"], head_dim=case["head_dim"], head_dim_v=case["head_dim_v"],
                                page_block_size=case["page"], dtype=case.get("dtype", torch.bfloat16)), backend_triton)
    check_against_reference(inputs, causal=case["causal"], parts=case["parts"])


def test_triton_fp8_and_sparse(backend_triton):
    inputs = moved(paged_inputs([90, 20], num_heads_q=16, seq_len_q=2), backend_triton)
    check_against_reference(inputs, fp8=True, causal=True, parts=3)
    indices = sparse_indices(inputs, 2, 80).to(backend_triton)
    check_against_reference(inputs, indices=indices, parts=5)
    check_against_reference(inputs, indices=indices, fp8=True)


def test_triton_wgmma_tiles(backend_triton):
    """64 query rows per KV head: sm_90's 64-row tiles, whose loop keeps its
    invariants inside it; dense (lengths of 1 and not a multiple of the tile),
    FP8 and causal, and sparse with -1 indices."""
    inputs = moved(paged_inputs([37, 1], num_heads_q=32, seq_len_q=2), backend_triton)
    check_against_reference(inputs, fp8=True, causal=True, parts=3)
    check_against_reference(inputs, parts=2)
    wide = moved(paged_inputs([50, 9], num_heads_q=64), backend_triton)
    check_against_reference(wide, indices=sparse_indices(wide, 1, 24).to(backend_triton), fp8=True)


@pytest.mark.parametrize("target", ["sm80", "gfx942"])
def test_triton_each_targets_configuration(backend_triton, target):
    """The tiles sm_80 and gfx942 launch with (the interpreter otherwise runs sm_90's):
    FP8 dense with a causal mask, and sparse."""
    from dsinfra.triton_utils import TARGETS, targeting

    inputs = moved(paged_inputs([70, 20], num_heads_q=16, seq_len_q=2), backend_triton)
    with targeting(TARGETS[target]):
        check_against_reference(inputs, fp8=True, causal=True, parts=3)
        check_against_reference(inputs, indices=sparse_indices(inputs, 2, 40).to(backend_triton), parts=2)


def test_triton_plan_outlives_growing_lengths(backend_triton):
    """A plan made before the sequences grew still covers their new tokens."""
    inputs = moved(paged_inputs([300, 10], num_heads_q=16, head_dim=64, head_dim_v=64, page_block_size=16), backend_triton)
    stale_plan = metadata.plan_splits(inputs.cache_seqlens - 9, 4)
    check_against_reference(inputs, plan=stale_plan)


@pytest.mark.gpu
@pytest.mark.parametrize("seq_len_q", [1, 2])
@pytest.mark.parametrize("num_heads_q", [16, 128])
def test_triton_gpu_deepseek_shapes(monkeypatch, seq_len_q, num_heads_q):
    monkeypatch.setenv("DSINFRA_BACKEND", "triton")
    inputs = moved(paged_inputs(seq_lengths(32, 4096, seed=3).tolist(), num_heads_q=num_heads_q, seq_len_q=seq_len_q), "cuda")
    check_against_reference(inputs, causal=True)
    check_against_reference(inputs, fp8=True)
    check_against_reference(inputs, indices=sparse_indices(inputs, seq_len_q, 2048).cuda(), fp8=True)


@pytest.mark.gpu
def test_torch_on_gpu(backend_torch):
    inputs = moved(paged_inputs(seq_lengths(8, 500, seed=4).tolist(), num_heads_q=128, seq_len_q=2), "cuda")
    check_against_reference(inputs, causal=True)


@st.composite
def small_problems(draw):
    heads_k = draw(st.sampled_from([1, 2]))
    head_dim_v = draw(st.sampled_from([16, 32]))
    return dict(
        lengths=draw(st.lists(st.integers(0, 150), min_size=1, max_size=5)),
        num_heads_q=heads_k * draw(st.sampled_from([1, 4, 16])),
        num_heads_k=heads_k,
        seq_len_q=draw(st.integers(1, 3)),
        head_dim=head_dim_v + draw(st.sampled_from([0, 8, 32])),
        head_dim_v=head_dim_v,
        page_block_size=draw(st.sampled_from([1, 16, 64, 61])),
        seed=draw(st.integers(0, 1000)),
    ), draw(st.booleans()), draw(st.sampled_from([None, 3]))


@given(small_problems())
def test_torch_random_problems(problem):
    kwargs, causal, parts = problem
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DSINFRA_BACKEND", "torch")
        patch.setattr("dsinfra.flash_mla.torch_impl.MAX_WAVE_TOKENS", 64)  # pieces and merges on small problems
        check_against_reference(paged_inputs(**kwargs), causal=causal, bound=SMALL_PROBLEM_BOUND)


@settings(max_examples=8)
@given(small_problems())
def test_triton_random_problems(problem):
    kwargs, causal, parts = problem
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DSINFRA_BACKEND", "triton")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        check_against_reference(moved(paged_inputs(**kwargs), device), causal=causal, parts=parts, bound=SMALL_PROBLEM_BOUND)


def test_torch_in_and_out_of_inference_mode(backend_torch):
    """The CPU path's kept buffers serve calls made in inference mode and outside it."""
    from dsinfra.flash_mla import torch_impl

    torch_impl._workspaces.__dict__.clear()
    inputs = paged_inputs([70, 5], num_heads_q=16, head_dim=64, head_dim_v=64, page_block_size=16)
    with torch.inference_mode():
        check_against_reference(inputs)
    check_against_reference(inputs)
    with torch.inference_mode():
        check_against_reference(inputs)
