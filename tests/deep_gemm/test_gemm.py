"""The dense FP8 GEMM: every implementation against the reference and against the
unquantised product, over DeepGEMM's shape list scaled down."""

import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsinfra import deep_gemm
from dsinfra.fp8 import per_block_cast_back, per_token_cast_back
from dsinfra.testing import calc_diff, randn

from .data import call, dense, to

# DeepGEMM's (k, n) pairs divided by 16 (by 32 for the widest): k a multiple of 16, mostly not of 128.
KN = [(448, 132), (96, 768), (32, 1024), (1024, 448), (448, 256), (128, 448)]
MS = [1, 64, 128, 200]
CLOSE_TO_REFERENCE = 1e-4  # the implementations differ from the reference by bf16 roundings only
DEEPGEMM_BOUND = 1e-3  # FP8 quantisation against the unquantised product, as DeepGEMM tests


def run_dense(implementation, a, b, m, n, device="cpu", **kwargs):
    out = torch.full((m, n), float("nan"), dtype=kwargs.pop("dtype", torch.bfloat16), device=device)
    call(implementation, deep_gemm.fp8_gemm_nt, tuple(to(device, *a)), tuple(to(device, *b)), out, **kwargs)
    return out.cpu().float()


@pytest.fixture(params=["bf16-matmul", "float32-matmul"])
def cpu_matmul(request, monkeypatch):
    """The CPU path both ways: dequantised into bf16 (CPUs that multiply it
    natively) and into float32 (the others), whichever this CPU is."""
    from dsinfra import backend

    monkeypatch.setattr(backend, "native_cpu_matmul", lambda dtype: request.param == "bf16-matmul")


@pytest.mark.parametrize("k,n", KN)
@pytest.mark.parametrize("m", MS)
def test_torch_matches_reference(cpu_matmul, m, k, n):
    a, b, exact = dense(m, n, k, seed=m + k)
    reference = run_dense("reference", a, b, m, n)
    out = run_dense("torch", a, b, m, n)
    assert calc_diff(out, reference) < CLOSE_TO_REFERENCE
    assert calc_diff(out, exact) < DEEPGEMM_BOUND


@pytest.mark.parametrize("m,k,n", [(1, 448, 132), (200, 96, 768), (64, 1024, 448), (128, 32, 256)])
def test_triton_matches_reference(kernel_device, m, k, n):
    a, b, exact = dense(m, n, k, seed=m + k)
    reference = run_dense("reference", a, b, m, n)
    out = run_dense("triton", a, b, m, n, kernel_device)
    assert calc_diff(out, reference) < CLOSE_TO_REFERENCE
    assert calc_diff(out, exact) < DEEPGEMM_BOUND


@given(m=st.integers(0, 300), n=st.integers(1, 300), k=st.integers(1, 400), seed=st.integers(0, 2**16))
def test_torch_matches_reference_on_any_shape(m, n, k, seed):
    """Elementwise: the CPU path rounds each dequantised operand to bf16 twice, where
    it multiplies in bf16 (relative error 2^-7 at most, so 2^-6 per product); both
    round the output to bf16."""
    a, b, _ = dense(m, n, k, seed=seed)
    out, reference = run_dense("torch", a, b, m, n), run_dense("reference", a, b, m, n)
    magnitude = per_token_cast_back(*a).abs() @ per_block_cast_back(*b).abs().T
    assert ((out - reference).abs() <= 2.0**-6 * magnitude + 2.0**-8 * (out.abs() + reference.abs())).all()


@pytest.mark.parametrize("implementation", ["reference", "torch", "triton"])
def test_layouts_and_recipes(implementation, kernel_device):
    """Column-major (TMA-aligned) LHS scales, a transposed RHS, 1x128 RHS scaling
    with a float32 output accumulated in place, and large scales all give the
    reference's answer."""
    device = kernel_device if implementation == "triton" else "cpu"
    m, n, k = 72, 136, 176
    a, b, _ = dense(m, n, k, seed=7)
    expected = run_dense("reference", a, b, m, n)

    col_major = (a[0], deep_gemm.get_col_major_tma_aligned_tensor(a[1]))
    assert col_major[1].stride(0) == 1
    assert torch.equal(run_dense(implementation, col_major, b, m, n, device), run_dense(implementation, a, b, m, n, device))

    b_t = deep_gemm.per_block_cast_to_fp8(randn(n, k, seed=8))
    b_t = (b_t[0].T.contiguous().T, b_t[1])  # column-major, as the input gradient's W.T is
    assert not b_t[0].is_contiguous()
    assert calc_diff(run_dense(implementation, a, b_t, m, n, device), run_dense("reference", a, b_t, m, n)) < CLOSE_TO_REFERENCE

    b_rows = deep_gemm.per_token_cast_to_fp8(randn(n, k, seed=9))
    c = randn(m, n, seed=10, device=device)
    d = c.clone()
    call(implementation, deep_gemm.fp8_gemm_nt, tuple(to(device, *a)), tuple(to(device, *b_rows)), d, c=d, recipe=(1, 1, 128))
    expected_acc = run_dense("reference", a, b_rows, m, n, dtype=torch.float32) + c.cpu()
    assert calc_diff(d.cpu(), expected_acc) < CLOSE_TO_REFERENCE

    huge = (a[0], a[1] * 2.0**40)  # scales far above FP8's range: the CPU path rescales them
    assert calc_diff(run_dense(implementation, huge, b, m, n, device), expected * 2.0**40) < CLOSE_TO_REFERENCE


def test_torch_path_is_thread_safe():
    """Threads dequantise into scratch memory of their own (DSINFRA_BACKEND=auto
    serves CPU tensors with the torch path)."""
    shapes = [(64, 300, 512), (200, 136, 256)]
    cases = [dense(m, n, k, seed=seed) for seed, (m, n, k) in enumerate(shapes)]
    expected = [run_dense("reference", a, b, m, n) for (a, b, _), (m, n, _) in zip(cases, shapes)]
    results = {}

    def work(i):
        (a, b, _), (m, n, _) = cases[i], shapes[i]
        outs = [torch.empty(m, n, dtype=torch.bfloat16) for _ in range(10)]
        for out in outs:
            deep_gemm.fp8_gemm_nt(a, b, out)
        results[i] = outs

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, outs in results.items():
        assert all(calc_diff(out.float(), expected[i]) < CLOSE_TO_REFERENCE for out in outs)
    assert len(results) == len(cases)


@pytest.mark.parametrize("implementation", ["reference", "torch", "triton"])
def test_no_rows(implementation, kernel_device):
    device = kernel_device if implementation == "triton" else "cpu"
    a, b, _ = dense(0, 64, 128)
    out = torch.empty(0, 64, dtype=torch.bfloat16, device=device)
    call(implementation, deep_gemm.gemm_fp8_fp8_bf16_nt, tuple(to(device, *a)), tuple(to(device, *b)), out)
    assert out.shape == (0, 64)


@pytest.mark.parametrize("target", ["sm80", "gfx942"])
def test_triton_fp8_as_each_target_reads_it(kernel_device, target):
    """sm_80's configuration decodes the bytes to fp16 in the kernel, gfx942's reads
    them as float8_e4m3fnuz (half the value; -0 must become +0): every FP8 value
    (NaN aside), subnormals and -0 included, gives the reference's product."""
    from dsinfra.triton_utils import TARGETS, targeting

    m, n, k = 70, 130, 200
    a, b, _ = dense(m, n, k, seed=3)
    a[0].view(torch.uint8)[0, :126] = torch.arange(1, 127, dtype=torch.uint8)
    a[0].view(torch.uint8)[1, :127] = torch.arange(128, 255, dtype=torch.uint8)  # 0x80 is -0
    b[0].view(torch.uint8)[:, 5] = 0x80
    reference = run_dense("reference", a, b, m, n)
    with targeting(TARGETS[target]):
        assert calc_diff(run_dense("triton", a, b, m, n, kernel_device), reference) < CLOSE_TO_REFERENCE


def test_triton_split_k_and_narrow_tiles(kernel_device):
    """A decode shape on sm_90's 132 SMs: 32-wide N tiles and K cut into splits whose
    float32 sums are added (with c) by a second kernel."""
    from dsinfra.deep_gemm import triton_impl
    from dsinfra.triton_utils import TARGETS, targeting

    m, n, k = 5, 96, 1100
    config = triton_impl.gemm_config(TARGETS["sm90"], m, n, k, split_k_allowed=True)
    assert config["BLOCK_N"] == 32 and config["SPLIT_K"] == 2
    a, b, _ = dense(m, n, k, seed=4)
    c = randn(m, n, seed=5, device=kernel_device)
    expected = run_dense("reference", a, b, m, n, dtype=torch.float32) + c.cpu()
    d = torch.empty(m, n, device=kernel_device)
    with targeting(TARGETS["sm90"]):
        call("triton", deep_gemm.fp8_gemm_nt, tuple(to(kernel_device, *a)), tuple(to(kernel_device, *b)), d, c=c)
    assert calc_diff(d.cpu(), expected) < CLOSE_TO_REFERENCE


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64, 4096])
def test_cuda_matches_reference(m):
    a, b, exact = dense(m, 2112, 7168, seed=1)
    out = run_dense("auto", a, b, m, 2112, "cuda")
    assert calc_diff(out, run_dense("reference", a, b, m, 2112)) < CLOSE_TO_REFERENCE
    assert calc_diff(out, exact) < DEEPGEMM_BOUND
