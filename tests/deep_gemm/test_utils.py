"""The utilities under DeepGEMM's names, the API's aliases, and the example in the docs."""

import pathlib

import pytest
import torch

from dsinfra import backend, deep_gemm, fp8
from dsinfra.testing import calc_diff


def test_integer_helpers():
    assert [deep_gemm.ceil_div(x, 128) for x in (0, 1, 128, 129)] == [0, 1, 1, 2]
    assert [deep_gemm.align(x, 128) for x in (0, 1, 128, 129)] == [0, 128, 128, 256]
    assert deep_gemm.get_m_alignment_for_contiguous_layout() == deep_gemm.get_mk_alignment_for_contiguous_layout() == 128
    assert [deep_gemm.get_tma_aligned_size(m, 4) for m in (1, 4, 5, 130)] == [4, 4, 8, 132]
    assert deep_gemm.get_tma_aligned_size(3, 2) == 8
    with pytest.raises(ValueError, match="element_size must divide 16"):
        deep_gemm.get_tma_aligned_size(3, 3)


def test_num_sms(monkeypatch):
    monkeypatch.setattr("dsinfra.deep_gemm.utils._num_sms", None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    available = backend.num_parallel_units(device)
    assert deep_gemm.get_num_sms() == available
    deep_gemm.set_num_sms(1)
    assert deep_gemm.get_num_sms() == 1
    with pytest.raises(ValueError, match=f"num_sms must be <= {available}"):
        deep_gemm.set_num_sms(available + 1)
    with pytest.raises(ValueError, match="num_sms must be > 0"):
        deep_gemm.set_num_sms(0)


@pytest.mark.parametrize("shape", [(5, 3), (8, 2), (1, 1), (2, 130, 3)])
def test_col_major_tma_aligned_tensor(shape):
    x = torch.randn(*shape)
    aligned = deep_gemm.get_col_major_tma_aligned_tensor(x)
    m, k = shape[-2:]
    aligned_m = deep_gemm.get_tma_aligned_size(m, 4)
    assert torch.equal(aligned, x)
    assert aligned.stride()[-2:] == (1, aligned_m)
    if len(shape) == 3:
        assert aligned.stride(0) == aligned_m * k
    assert deep_gemm.get_col_major_tma_aligned_tensor(aligned) is aligned  # already aligned: as is
    assert deep_gemm.get_mn_major_tma_aligned_tensor is deep_gemm.get_col_major_tma_aligned_tensor
    with pytest.raises(ValueError, match="x must have 2 or 3 dimensions"):
        deep_gemm.get_col_major_tma_aligned_tensor(torch.zeros(3))


def test_names():
    assert deep_gemm.m_grouped_fp8_gemm_nt_contiguous is deep_gemm.m_grouped_fp8_fp4_gemm_nt_contiguous
    assert deep_gemm.m_grouped_fp8_gemm_nt_masked is deep_gemm.fp8_m_grouped_gemm_nt_masked
    assert deep_gemm.fp8_gemm_tt is deep_gemm.fp8_fp4_gemm_tt
    x = torch.randn(3, 200, dtype=torch.float32)
    assert all(torch.equal(u, v) for u, v in zip(deep_gemm.per_token_cast_to_fp8(x), fp8.per_token_cast_to_fp8(x)))
    assert deep_gemm.per_block_cast_back is fp8.per_block_cast_back
    assert deep_gemm.calc_diff is calc_diff
    assert all(callable(getattr(deep_gemm, name)) for name in deep_gemm.__all__ if name not in ("OPERATIONS", "testing", "utils", "legacy"))
    assert deep_gemm.OPERATIONS == (
        "fp8_gemm_nt",
        "m_grouped_fp8_gemm_nt_contiguous",
        "m_grouped_fp8_gemm_nt_masked",
        "k_grouped_fp8_gemm_tn_contiguous",
        "bf16_gemm_nt",
        "fp8_mqa_logits",
        "fp8_paged_mqa_logits",
    )


def test_docs_example_runs():
    """The example in docs/deep_gemm.md works as written."""
    page = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "deep_gemm.md").read_text()
    example = page.split("```python\n")[1].split("```")[0]
    exec(compile(example, "docs/deep_gemm.md", "exec"), {})
