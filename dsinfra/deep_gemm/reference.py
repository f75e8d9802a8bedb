"""The specification: dequantise every operand to float32, multiply, round once.

Plain PyTorch, obviously correct, slow is fine. Arguments arrive checked by the
public functions in ``dsinfra.deep_gemm``; every other implementation is tested
against these.
"""

from __future__ import annotations

import torch

from dsinfra.deep_gemm.utils import ceil_div, rhs_rows_per_scale
from dsinfra.fp8 import GROUP, per_block_cast_back, per_token_cast_back


def _dequantise_rhs(b: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """b: [n, k] float8_e4m3fn with 128x128 or 1x128 scales sb -> [n, k] float32."""
    if rhs_rows_per_scale(sb, b.shape[0]) == 1:
        return per_token_cast_back(b, sb)
    return per_block_cast_back(b, sb)


def fp8_gemm_nt(a, sa, b, sb, d, c) -> None:
    """d = c + (a * sa) @ (b * sb).T; see :func:`dsinfra.deep_gemm.fp8_gemm_nt`."""
    result = per_token_cast_back(a, sa) @ _dequantise_rhs(b, sb).T
    if c is not None:
        result += c
    d.copy_(result)


def m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, d, m_indices) -> None:
    """Row i of d = row i of a times b[m_indices[i]].T; rows marked -1 are left alone."""
    for group in range(b.shape[0]):
        rows = (m_indices == group).nonzero().squeeze(1)
        d[rows] = (per_token_cast_back(a[rows], sa[rows]) @ per_block_cast_back(b[group], sb[group]).T).to(d.dtype)


def m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, d, masked_m, expected_m) -> None:
    """d[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g].T; the rows past masked_m[g] are left alone."""
    for group, rows in enumerate(masked_m.tolist()):
        lhs = per_token_cast_back(a[group, :rows], sa[group, :rows])
        d[group, :rows] = (lhs @ per_block_cast_back(b[group], sb[group]).T).to(d.dtype)


def k_grouped_fp8_gemm_tn_contiguous(a, sa, b, sb, d, ks, c) -> None:
    """d[g] = c[g] + a[K_g].T @ b[K_g], K_g the g-th run of ks[g] rows; each group
    owns its own ceil(ks[g]/128) scale rows."""
    start = scale_start = 0
    for group, k in enumerate(ks):
        scale_stop = scale_start + ceil_div(k, GROUP)
        lhs = per_token_cast_back(a[start : start + k].T, sa[scale_start:scale_stop].T)
        rhs = per_token_cast_back(b[start : start + k].T, sb[scale_start:scale_stop].T)
        result = lhs @ rhs.T
        if c is not None:
            result += c[group]
        d[group] = result
        start, scale_start = start + k, scale_stop


def _indexer_scores(q: torch.Tensor, keys: torch.Tensor, key_scales: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """q [rows, heads, d], keys [n, d] -> [rows, n]: sum over heads of weights * relu(q · k * key_scale)."""
    scores = torch.einsum("rhd,nd->rhn", q.float(), keys.float()) * key_scales.float()
    return torch.einsum("rhn,rh->rn", scores.relu(), weights.float())


def mqa_logits(q, kv, kv_scales, weights, ks, ke, clean_logits, max_seqlen_k, logits_dtype) -> torch.Tensor:
    """Every query against every key, then -inf outside [ks[i], ke[i]); see
    :func:`dsinfra.deep_gemm.fp8_fp4_mqa_logits`. Unspecified entries are -inf here."""
    logits = _indexer_scores(q, kv, kv_scales, weights)
    seq_len_kv = kv.shape[0]
    if max_seqlen_k:  # column j scores key ks[i] + j
        keys = ks[:, None].long() + torch.arange(max_seqlen_k, device=q.device)
        seen = keys < ke[:, None]
        logits = logits.gather(1, keys.clamp(max=max(seq_len_kv - 1, 0))) if seq_len_kv else logits.new_zeros(keys.shape)
    else:
        keys = torch.arange(seq_len_kv, device=q.device)[None, :]
        seen = (keys >= ks[:, None]) & (keys < ke[:, None])
    return logits.masked_fill(~seen, float("-inf")).to(logits_dtype)


def paged_mqa_logits(q, kv, kv_scales, weights, visible, block_table, max_context_len, clean_logits, logits_dtype) -> torch.Tensor:
    """Each query row r (sequence r // next_n) against the first visible[r] keys of
    its sequence, gathered through the block table; -inf past them (unspecified
    entries are -inf here). See :func:`dsinfra.deep_gemm.fp8_fp4_paged_mqa_logits`."""
    batch_size, next_n = q.shape[:2]
    block_kv = kv.shape[1]
    logits = torch.full((batch_size * next_n, max_context_len), float("-inf"), dtype=torch.float32, device=q.device)
    for row, count in enumerate(visible.tolist()):
        sequence, token = divmod(row, next_n)
        positions = torch.arange(count, device=q.device)
        blocks = block_table[sequence, positions // block_kv].long()
        keys, key_scales = kv[blocks, positions % block_kv], kv_scales[blocks, positions % block_kv]
        logits[row, :count] = _indexer_scores(q[sequence, token][None], keys, key_scales, weights[row][None])[0]
    return logits.to(logits_dtype)


def bf16_gemm_nt(a, b, d, c) -> None:
    """d = c + a @ b.T in float32, rounded once (a, b: bfloat16, or float32 from
    dequantised operands); see :func:`dsinfra.deep_gemm.bf16_gemm_nt`."""
    result = a.float() @ b.float().T
    if c is not None:
        result += c.float()
    d.copy_(result)
