"""The indexer's scores (fp8_mqa_logits, fp8_paged_mqa_logits and their FP4 forms):
every implementation against the reference, the reference against the
unquantised scores, over awkward shapes; padding that must never be read holds NaN."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from dsinfra import deep_gemm
from dsinfra.deep_gemm import per_custom_dims_cast_to_fp8, per_token_cast_to_fp4
from dsinfra.testing import calc_diff, generator, randn

from .data import FP8_NAN, call

INF = float("-inf")
CLOSE = 1e-9  # implementations differ from the reference in float32 summation order only
# bfloat16 logits: DeepGEMM's bound; Triton's interpreter rounds float32 to bfloat16 toward zero
CLOSE_BF16 = 3e-5
QUANTISED = {False: 1e-3, True: 0.02}  # against unquantised scores, DeepGEMM's bounds for FP8 / FP4


def exact_logits(q, k, weights, seen):
    """Unquantised scores: q [rows, heads, d], k [n, d] float; -inf where not seen."""
    scores = torch.einsum("rhd,nd->rhn", q, k).relu()
    return torch.einsum("rhn,rh->rn", scores, weights.float()).masked_fill(~seen, INF)


def cast_queries(q, fp4):
    if not fp4:
        return q.to(torch.float8_e4m3fn), None
    values, scales = per_token_cast_to_fp4(q.reshape(-1, q.shape[-1]), True, 32, True)
    return values.view(*q.shape[:-1], -1), scales.view(q.shape[:-1])


def cast_keys(k, fp4):
    if not fp4:
        values, scales = per_custom_dims_cast_to_fp8(k, (0,))
        return values, scales.reshape(-1)  # one key squeezes to a scalar
    values, scales = per_token_cast_to_fp4(k, True, 32, True)
    return values, scales.view(-1)


def compare(out, reference, seen):
    """Equal -inf pattern where seen; values within CLOSE; unspecified entries ignored."""
    out, reference = out.float(), reference.float()
    assert torch.equal(out[seen] == INF, reference[seen] == INF)
    assert calc_diff(out[seen].nan_to_num(neginf=0), reference[seen].nan_to_num(neginf=0)) < CLOSE


def ranges(seq_len, seq_len_kv, seed):
    """Per-query [start, end): empty, single, whole and random ranges."""
    g = generator(seed)
    starts = torch.randint(0, seq_len_kv + 1, (seq_len,), generator=g)
    ends = torch.randint(0, seq_len_kv + 1, (seq_len,), generator=g)
    starts[0], ends[0] = 0, seq_len_kv
    if seq_len > 1:
        starts[1], ends[1] = seq_len_kv // 2, seq_len_kv // 2  # sees nothing
    return starts.to(torch.int32), ends.to(torch.int32)


PREFILL = [  # seq_len, seq_len_kv, heads, head_dim, fp4
    (1, 1, 1, 32, False),
    (5, 37, 3, 40, False),
    (17, 130, 8, 64, False),
    (9, 70, 4, 128, True),
    (3, 65, 2, 64, True),
]


@pytest.mark.parametrize("seq_len,seq_len_kv,heads,head_dim,fp4", PREFILL)
@pytest.mark.parametrize("implementation", ["torch", "triton"])
def test_mqa_logits(implementation, kernel_device, seq_len, seq_len_kv, heads, head_dim, fp4):
    seed = seq_len + seq_len_kv
    q, k = randn(seq_len, heads, head_dim, seed=seed), randn(seq_len_kv, head_dim, seed=seed + 1)
    weights = randn(seq_len, heads, seed=seed + 2)
    starts, ends = ranges(seq_len, seq_len_kv, seed)
    q_in, kv_in = cast_queries(q, fp4), cast_keys(k, fp4)
    seen = (torch.arange(seq_len_kv)[None] >= starts[:, None]) & (torch.arange(seq_len_kv)[None] < ends[:, None])
    args = (q_in, kv_in, weights, starts, ends)
    reference = call("reference", deep_gemm.fp8_fp4_mqa_logits, *args)
    assert calc_diff(reference.masked_fill(~seen, 0), exact_logits(q, k, weights, seen).masked_fill(~seen, 0)) < QUANTISED[fp4]
    assert torch.equal(reference == INF, ~seen)
    moved = [tuple(t.to(kernel_device) if t is not None else None for t in a) if isinstance(a, tuple) else a.to(kernel_device) for a in args]
    out = call(implementation, deep_gemm.fp8_fp4_mqa_logits, *moved).cpu()
    assert out.dtype == torch.float32 and torch.equal(out == INF, ~seen)  # clean: -inf exactly where unseen
    compare(out, reference, torch.ones_like(seen))

    # compressed: column j scores key start + j; entries past the range are unspecified
    width = max(1, int((ends - starts).max()))
    compressed = call(implementation, deep_gemm.fp8_fp4_mqa_logits, *moved, clean_logits=False, max_seqlen_k=width).cpu()
    columns = torch.arange(width)[None]
    valid = columns < (ends - starts)[:, None]
    expected = reference.gather(1, (starts[:, None] + columns).clamp(max=seq_len_kv - 1).long())
    assert compressed.shape == (seq_len, width)
    compare(compressed, expected, valid)

    # bfloat16 logits from bfloat16 weights
    halves = call(implementation, deep_gemm.fp8_fp4_mqa_logits, *moved[:2], moved[2].bfloat16(), *moved[3:], logits_dtype=torch.bfloat16)
    assert halves.dtype == torch.bfloat16
    expected = call("reference", deep_gemm.fp8_fp4_mqa_logits, *args[:2], weights.bfloat16(), *args[3:], logits_dtype=torch.bfloat16)
    assert calc_diff(halves.cpu().float().masked_fill(~seen, 0), expected.float().masked_fill(~seen, 0)) < CLOSE_BF16


def fused_cache(k, block_kv, fp4):
    """k [num_blocks * block_kv, d] -> DeepGEMM's fused cache [num_blocks, block_kv, 1, bytes]
    (each block its values, then its scales) and the keys' unquantised values."""
    num_blocks = k.shape[0] // block_kv
    values, scales = cast_keys(k, fp4)
    values = values.view(torch.uint8).reshape(num_blocks, -1)
    scales = scales.contiguous().view(torch.uint8).reshape(num_blocks, -1)
    return torch.cat((values, scales), dim=1).view(num_blocks, block_kv, 1, -1).contiguous()


PAGED = [  # batch, next_n, heads, head_dim, block_kv, lengths, fp4
    (1, 1, 1, 32, 16, [1], False),
    (3, 2, 3, 40, 16, [0, 37, 16], False),
    (2, 3, 8, 64, 64, [130, 5], False),
    (2, 1, 4, 128, 32, [70, 33], True),
]


def paged_case(batch, next_n, heads, head_dim, block_kv, lengths, fp4, two_d):
    seed = batch * 7 + next_n + head_dim
    lengths = torch.tensor(lengths, dtype=torch.int32)
    blocks_per_sequence = (lengths.max().item() + block_kv - 1) // block_kv + 1
    num_blocks = batch * blocks_per_sequence + 2
    k = randn(num_blocks * block_kv, head_dim, seed=seed)
    cache = fused_cache(k, block_kv, fp4)
    table = torch.randperm(num_blocks, generator=generator(seed))[: batch * blocks_per_sequence].view(batch, -1).to(torch.int32)
    used = (lengths + block_kv - 1) // block_kv
    read = torch.arange(blocks_per_sequence)[None] < used[:, None]
    cache[~torch.isin(torch.arange(num_blocks), table[read])] = FP8_NAN  # blocks no query reads
    table[~read] = -1  # entries no query reads
    q = randn(batch, next_n, heads, head_dim, seed=seed + 1)
    weights = randn(batch * next_n, heads, seed=seed + 2)
    if two_d:
        lens = (torch.rand(batch, next_n, generator=generator(seed)) * (lengths[:, None] + 1)).to(torch.int32)
        lens[:, -1] = lengths
        visible = lens.view(-1)
    else:
        lens = lengths
        visible = (lengths[:, None] - next_n + 1 + torch.arange(next_n)).clamp(min=0).view(-1)
    max_context_len = int(lengths.max()) + 3
    seen = torch.arange(max_context_len)[None] < visible[:, None]
    exact = torch.full((batch * next_n, max_context_len), INF)
    for row, count in enumerate(visible.tolist()):
        positions = torch.arange(count)
        keys = k.view(num_blocks, block_kv, head_dim)[table[row // next_n, positions // block_kv].long(), positions % block_kv]
        everything = torch.ones(1, count, dtype=torch.bool)
        exact[row, :count] = exact_logits(q[row // next_n, row % next_n][None], keys, weights[row][None], everything)[0]
    args = (cast_queries(q, fp4), cache, weights, lens, table, deep_gemm.get_paged_mqa_logits_metadata(lens.view(batch, -1), block_kv, 4), max_context_len)
    return args, seen, exact


@pytest.mark.parametrize("batch,next_n,heads,head_dim,block_kv,lengths,fp4", PAGED)
@pytest.mark.parametrize("two_d", [False, True])
@pytest.mark.parametrize("implementation", ["torch", "triton"])
def test_paged_mqa_logits(implementation, kernel_device, two_d, batch, next_n, heads, head_dim, block_kv, lengths, fp4):
    args, seen, exact = paged_case(batch, next_n, heads, head_dim, block_kv, lengths, fp4, two_d)
    reference = call("reference", deep_gemm.fp8_fp4_paged_mqa_logits, *args, clean_logits=True)
    assert torch.equal(reference == INF, ~seen)
    assert calc_diff(reference.masked_fill(~seen, 0), exact.masked_fill(~seen, 0)) < QUANTISED[fp4]
    moved = [tuple(t.to(kernel_device) if t is not None else None for t in a) if isinstance(a, tuple) else a for a in args]
    moved = [a.to(kernel_device) if isinstance(a, torch.Tensor) else a for a in moved]
    out = call(implementation, deep_gemm.fp8_fp4_paged_mqa_logits, *moved, clean_logits=True).cpu()
    assert torch.equal(out == INF, ~seen)
    compare(out, reference, torch.ones_like(seen))
    unclean = call(implementation, deep_gemm.fp8_fp4_paged_mqa_logits, *moved, logits_dtype=torch.bfloat16).cpu()
    assert unclean.dtype == torch.bfloat16
    assert calc_diff(unclean.float()[seen], reference[seen]) < CLOSE_BF16


def test_earlier_names_are_fp8_float32():
    args, seen, _ = paged_case(2, 2, 4, 32, 16, [20, 9], False, False)
    (q, _), *rest = args
    out = deep_gemm.fp8_paged_mqa_logits(q, *rest, clean_logits=True)
    assert torch.equal(out, deep_gemm.fp8_fp4_paged_mqa_logits(*args, clean_logits=True))
    q, k, w = randn(4, 2, 32, seed=1).to(torch.float8_e4m3fn), randn(9, 32, seed=2), randn(4, 2, seed=3)
    ks, ke = torch.zeros(4, dtype=torch.int32), torch.tensor([9, 1, 0, 4], dtype=torch.int32)
    kv = per_custom_dims_cast_to_fp8(k, (0,))
    assert torch.equal(deep_gemm.fp8_mqa_logits(q, kv, w, ks, ke), deep_gemm.fp8_fp4_mqa_logits((q, None), kv, w, ks, ke))


def test_metadata():
    lens = torch.tensor([300, 0, 600, 100], dtype=torch.int32)  # 2, 0, 3, 1 splits of 256 keys
    meta = deep_gemm.get_paged_mqa_logits_metadata(lens, 64, 4)
    assert meta.dtype == torch.int32 and meta.tolist() == [[0, 0], [0, 1], [2, 0], [2, 2], [4, 0]]
    two_d = deep_gemm.get_paged_mqa_logits_metadata(torch.stack((lens, lens), 1), 64, 3)  # next_n = 2: one unit a row
    assert two_d.tolist() == [[0, 0], [2, 0], [2, 2], [4, 0]]
    tokens = torch.tensor([0, 0, 0, 1, 2, 2], dtype=torch.int32)  # units: tokens (0, 1), 2, 3, (4, 5)
    varlen = deep_gemm.get_paged_mqa_logits_metadata(torch.tensor([10, 300, 301, 5, 6, 7], dtype=torch.int32), 64, 2, tokens)
    assert varlen.tolist() == [[0, 0], [2, 1], [6, 0]]  # 2 + 2 + 1 + 1 splits: 3 each
    assert deep_gemm.get_paged_mqa_logits_metadata(torch.zeros(0, dtype=torch.int32), 64, 2).tolist() == [[0, 0], [0, 0], [0, 0]]


def test_default_dtype_does_not_matter():
    args, _, _ = paged_case(2, 2, 4, 32, 16, [20, 9], False, True)
    before = {i: call(i, deep_gemm.fp8_fp4_paged_mqa_logits, *args, clean_logits=True) for i in ("reference", "torch")}
    q, k, w = randn(3, 2, 32, seed=1), randn(9, 32, seed=2), randn(3, 2, seed=3)
    prefill = (cast_queries(q, True), cast_keys(k, True), w, torch.zeros(3, dtype=torch.int32), torch.full((3,), 9, dtype=torch.int32))
    fp4_before = deep_gemm.fp8_fp4_mqa_logits(*prefill)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        for implementation, out in before.items():
            assert torch.equal(call(implementation, deep_gemm.fp8_fp4_paged_mqa_logits, *args, clean_logits=True), out)
        assert torch.equal(deep_gemm.fp8_fp4_mqa_logits(*prefill), fp4_before)
        assert torch.equal(deep_gemm.get_paged_mqa_logits_metadata(args[3], 16, 3), deep_gemm.get_paged_mqa_logits_metadata(args[3], 16, 3))
    finally:
        torch.set_default_dtype(default)


def test_bad_arguments():
    q, k, w = randn(4, 2, 32, seed=1).to(torch.float8_e4m3fn), randn(9, 32, seed=2), randn(4, 2, seed=3)
    kv = per_custom_dims_cast_to_fp8(k, (0,))
    ks, ke = torch.zeros(4, dtype=torch.int32), torch.full((4,), 9, dtype=torch.int32)
    with pytest.raises(TypeError, match="q must be a pair"):
        deep_gemm.fp8_fp4_mqa_logits(q, kv, w, ks, ke)
    with pytest.raises(ValueError, match=r"kv\[0\] must have shape"):
        deep_gemm.fp8_mqa_logits(q, (kv[0][:, :16], kv[1]), w, ks, ke)
    with pytest.raises(TypeError, match="cu_seq_len_k_start must have dtype int32"):
        deep_gemm.fp8_mqa_logits(q, kv, w, ks.long(), ke)
    with pytest.raises(ValueError, match="cu_seq_len_k_end must hold values in"):
        deep_gemm.fp8_mqa_logits(q, kv, w, ks, ke + 1)
    with pytest.raises(ValueError, match="clean_logits must be False"):
        deep_gemm.fp8_mqa_logits(q, kv, w, ks, ke, max_seqlen_k=4)
    with pytest.raises(TypeError, match="weights may be bfloat16 only"):
        deep_gemm.fp8_mqa_logits(q, kv, w.bfloat16(), ks, ke)
    args, _, _ = paged_case(2, 1, 4, 32, 16, [20, 9], False, False)
    q_pair, cache, weights, lens, table, meta, width = args
    with pytest.raises(ValueError, match="kv_cache must have shape"):
        deep_gemm.fp8_fp4_paged_mqa_logits(q_pair, cache[..., :-1], weights, lens, table, meta, width)
    with pytest.raises(ValueError, match="context_lens must hold values in"):
        deep_gemm.fp8_fp4_paged_mqa_logits(q_pair, cache, weights, lens + width, table, meta, width)
    with pytest.raises(ValueError, match="block_table must hold values in"):
        deep_gemm.fp8_fp4_paged_mqa_logits(q_pair, cache, weights, lens, table.abs() + cache.shape[0], meta, width)
    with pytest.raises(ValueError, match="indices need one query token per row"):
        deep_gemm.get_paged_mqa_logits_metadata(torch.ones(2, 2, dtype=torch.int32), 16, 2, torch.zeros(2, dtype=torch.int32))


def compile_kernels() -> None:
    """The prefill kernel for sm_90 (FP8 operands), the paged one for sm_80 (bfloat16
    operands, as GPUs without FP8 dots get them); 64 heads of 128."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsinfra.deep_gemm import triton_mqa_logits as kernels

    tile = dict(BLOCK_ROWS=2, BLOCK_HEADS=64, BLOCK_DIM=128, BLOCK_KEYS=64)
    for arch, operand, kernel, pointers, flags in [
        (90, "*fp8e4nv", kernels._mqa_logits_kernel, dict(ks_ptr="*i32", ke_ptr="*i32"), dict(COMPRESSED=False, CLEAN=True)),
        (80, "*bf16", kernels._paged_mqa_logits_kernel, dict(visible_ptr="*i32", table_ptr="*i32"), dict(CLEAN=False)),
    ]:
        pointers.update(q_ptr=operand, kv_ptr=operand, kv_scale_ptr="*fp32", w_ptr="*fp32", out_ptr="*bf16")
        constants = {**flags, **tile}
        signature = {name: "constexpr" if name in constants else pointers.get(name, "i32") for name in kernel.arg_names}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
        triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 2})


def test_kernels_compile_for_cuda():
    pytest.importorskip("triton.backends.nvidia")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", "from tests.deep_gemm.test_mqa_logits import compile_kernels; compile_kernels()"]
    result = subprocess.run(command, cwd=pathlib.Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
