"""MLA decoding over a paged KV cache, and sparse MLA prefill, with FlashMLA's API (deepseek-ai/FlashMLA).

FlashMLA's current flow (the plan is made by the first call and reused)::

    sched_meta, _ = get_mla_metadata()
    for layer in layers:
        out, lse = flash_mla_with_kvcache(q, k_cache[layer], block_table, cache_seqlens, head_dim_v,
                                          sched_meta, None, causal=True)

and its 2025 flow (the plan's tensors made up front), both served::

    tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens, seq_len_q * num_heads_q // num_heads_k, num_heads_k)
    for layer in layers:
        out, lse = flash_mla_with_kvcache(q, k_cache[layer], block_table, cache_seqlens, head_dim_v,
                                          tile_scheduler_metadata, num_splits, causal=True)

Implementations: ``reference.py`` (the specification), ``torch_impl.py`` (the
CPU path), ``triton_impl.py`` (the GPU path); ``dsinfra.backend`` picks one per
call. Sparse decoding's extras (``attn_sink``, ``topk_length``, an extra cache)
reach the CPU and GPU paths through ``decoding_extras.py``. See docs/flash_mla.md.
"""

from __future__ import annotations

import numbers

import torch

from dsinfra import backend
from dsinfra.flash_mla import decoding_extras, kernel_caches
from dsinfra.flash_mla.fp8_cache import MODEL1_BYTES_PER_TOKEN, dequantize_k_cache, fp8_layout, quantize_k_cache
from dsinfra.flash_mla.metadata import get_mla_metadata
from dsinfra.flash_mla.sched_meta import FlashMLASchedMeta, record_or_check
from dsinfra.validation import check_range, check_tensor

__all__ = [
    "OPERATIONS",
    "FlashMLASchedMeta",
    "dequantize_k_cache",
    "flash_mla_sparse_fwd",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "quantize_k_cache",
]

OPERATIONS = ("flash_mla_with_kvcache", "flash_mla_sparse_fwd")

Plan = tuple[torch.Tensor, torch.Tensor]


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor | FlashMLASchedMeta,
    num_splits: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    extra_k_cache: torch.Tensor | None = None,
    extra_indices_in_kvcache: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a few new queries per sequence over a paged KV cache (MLA: V is part of K).

    q: [batch, seq_len_q, num_heads_q, head_dim], torch.bfloat16 or torch.float16.
    k_cache: [num_blocks, page_block_size, num_heads_k, head_dim] in q's dtype;
        V is its first head_dim_v channels. With ``is_fp8_kvcache``:
        [num_blocks, page_block_size, num_heads_k, bytes_per_token], torch.float8_e4m3fn
        (or uint8), in the V3.2 layout (656 bytes for 576/512) or the MODEL1 layout
        (584 bytes for 512/512) of :mod:`dsinfra.flash_mla.fp8_cache`, as
        :func:`quantize_k_cache` makes them. Any strides, blocks may lie apart; an FP8
        cache needs each token's entry contiguous (MODEL1: each block).
    block_table: [batch, max_blocks_per_seq], torch.int32: sequence b's token t lives in
        block ``block_table[b, t // page_block_size]``. Entries past a sequence's
        length are never read. Not needed (may be None) with ``indices``.
    cache_seqlens: [batch], torch.int32, each sequence's length. Not needed with ``indices``.
    head_dim_v: channels of V (512 for DeepSeek-V3), at most head_dim.
    tile_scheduler_metadata, num_splits: the plan of :func:`get_mla_metadata` for
        this batch, or a :class:`FlashMLASchedMeta` from ``get_mla_metadata()``
        with ``num_splits=None`` (filled by its first call, reused by the next).
    softmax_scale: scale of q·Kᵀ before the softmax; default head_dim ** -0.5.
    causal: with seq_len_q > 1 (speculative decoding), query i of a sequence of
        length L sees keys 0 .. L - seq_len_q + i.
    is_fp8_kvcache: k_cache (and extra_k_cache) are FP8 caches.
    indices: [batch, seq_len_q, topk], torch.int32, token-level sparse attention:
        query (b, i) attends to the slots ``indices[b, i]`` (slot = block *
        page_block_size + offset); -1 entries are ignored. Not with ``causal``.
    attn_sink: [num_heads_q], torch.float32 (sparse only): out is scaled by
        exp(lse) / (exp(lse) + exp(attn_sink[h])); lse is not changed.
    extra_k_cache, extra_indices_in_kvcache: a second cache (same head dims, heads and
        format, its own page size) and its [batch, seq_len_q, extra_topk] int32 slots,
        attended to in the same softmax as ``indices`` (sparse only).
    topk_length, extra_topk_length: [batch], torch.int32 in [0, topk] (resp. extra_topk):
        only the first topk_length[b] index positions of batch entry b are used.

    Returns (out [batch, seq_len_q, num_heads_q, head_dim_v] in q's dtype,
    softmax_lse [batch, num_heads_q, seq_len_q] torch.float32, natural log).
    A query that sees no key gets out = 0 and lse = +inf. Cache slots past a
    sequence's length (or not in the indices in use) may hold anything, NaN included.
    """
    extras = dict(attn_sink=attn_sink, extra_k_cache=extra_k_cache, extra_indices_in_kvcache=extra_indices_in_kvcache,
                  topk_length=topk_length, extra_topk_length=extra_topk_length)
    _check_arguments(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache, indices)
    _check_extras(q, k_cache, head_dim_v, is_fp8_kvcache, indices, **extras)
    plan, extra_plan = _plans(q, k_cache, cache_seqlens, causal, is_fp8_kvcache, indices, extra_k_cache,
                              extra_indices_in_kvcache, tile_scheduler_metadata, num_splits)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    softmax_scale = float(softmax_scale)
    implementation = backend.choose("flash_mla_with_kvcache", q.device)
    impl = backend.load(__name__, implementation)
    if implementation == "reference":  # the specification takes every argument itself
        return impl.flash_mla_with_kvcache(
            q, k_cache, block_table, cache_seqlens, head_dim_v, *plan, softmax_scale, causal, is_fp8_kvcache, indices, **extras
        )
    core = kernel_caches.addressing_caches(impl.flash_mla_with_kvcache) if implementation == "triton" else impl.flash_mla_with_kvcache
    if all(value is None for value in extras.values()):
        return core(q, k_cache, block_table, cache_seqlens, head_dim_v, *plan, softmax_scale, causal, is_fp8_kvcache, indices)
    return decoding_extras.flash_mla_with_kvcache(
        core, q, k_cache, head_dim_v, plan, softmax_scale, is_fp8_kvcache, indices, attn_sink, extra_k_cache,
        extra_indices_in_kvcache, topk_length, extra_topk_length, extra_plan,
    )


def flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse attention prefill (DeepSeek-V3.2's attention over its indexer's top-k tokens).

    q: [s_q, h_q, d_qk], torch.bfloat16 or torch.float16.
    kv: [s_kv, h_kv, d_qk] in q's dtype; V is its first d_v channels. Any strides.
    indices: [s_q, h_kv, topk], torch.int32: query s (heads of KV head g) attends to
        rows ``indices[s, g]`` of ``kv[:, g]``; entries outside [0, s_kv) (-1, or
        s_kv and beyond) are ignored. Rows of kv no query uses may hold NaN.
    sm_scale: scale of q·Kᵀ before the softmax.
    d_v: channels of V, at most d_qk (upstream: 512).
    attn_sink: [h_q], torch.float32: out is scaled by exp(lse) / (exp(lse) + exp(attn_sink[h]))
        (+inf makes out 0, -inf changes nothing); max_logits and lse are not changed.
    topk_length: [s_q], torch.int32 in [0, topk]: query s uses only ``indices[s, :, :topk_length[s]]``.

    Returns (out [s_q, h_q, d_v] in q's dtype, max_logits [s_q, h_q] torch.float32: the largest
    scaled score, lse [s_q, h_q] torch.float32: natural-log log-sum-exp of the scaled scores).
    A (query, head) that sees no key gets out = 0, max_logits = -inf and lse = +inf.
    """
    check_tensor("q", q, dtype=(torch.bfloat16, torch.float16), shape=("s_q", "h_q", "d_qk"))
    s_q, h_q, d_qk = q.shape
    if min(q.shape) == 0:
        raise ValueError(f"q must have no empty dimension; got shape {list(q.shape)}")
    check_tensor("kv", kv, dtype=q.dtype, shape=("s_kv", "h_kv", d_qk), device=q.device)
    if min(kv.shape) == 0:
        raise ValueError(f"kv must have no empty dimension; got shape {list(kv.shape)}")
    h_kv = kv.shape[1]
    if h_q % h_kv:
        raise ValueError(f"h_q ({h_q}, q's dimension 1) must be a multiple of h_kv ({h_kv}, kv's dimension 1)")
    check_tensor("indices", indices, dtype=torch.int32, shape=(s_q, h_kv, "topk"), device=q.device)
    if indices.shape[2] == 0:
        raise ValueError(f"indices must have topk >= 1; got shape {list(indices.shape)}")
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real):
        raise TypeError(f"sm_scale must be a float; got {type(sm_scale).__name__}")
    if isinstance(d_v, bool) or not isinstance(d_v, int):
        raise TypeError(f"d_v must be an int; got {type(d_v).__name__}")
    if not 0 < d_v <= d_qk:
        raise ValueError(f"d_v must be in [1, d_qk={d_qk}]; got {d_v}")
    if attn_sink is not None:
        check_tensor("attn_sink", attn_sink, dtype=torch.float32, shape=(h_q,), device=q.device)
    if topk_length is not None:
        check_tensor("topk_length", topk_length, dtype=torch.int32, shape=(s_q,), device=q.device)
        check_range("topk_length", topk_length, 0, indices.shape[2] + 1)
    impl = backend.load(__name__, backend.choose("flash_mla_sparse_fwd", q.device))
    return impl.flash_mla_sparse_fwd(q, kv, indices, float(sm_scale), d_v, attn_sink, topk_length)


def _plans(
    q, k_cache, cache_seqlens, causal, is_fp8_kvcache, indices, extra_k_cache, extra_indices, tile_scheduler_metadata,
    num_splits,
) -> tuple[Plan, Plan | None]:
    """The split plans of the call (and of the extra cache's indices): given, recorded
    in a FlashMLASchedMeta, or made now."""
    batch, seq_len_q, num_heads_q, _ = q.shape
    num_heads_k = k_cache.shape[2]

    def make(topk: int | None) -> Plan:
        lengths = cache_seqlens if topk is None else torch.zeros(batch, dtype=torch.int32, device=q.device)
        return get_mla_metadata(lengths, seq_len_q * num_heads_q // num_heads_k, num_heads_k, num_heads_q, is_fp8_kvcache, topk)

    topk = None if indices is None else indices.shape[-1]
    extra_topk = None if extra_indices is None else extra_indices.shape[-1]
    if not isinstance(tile_scheduler_metadata, FlashMLASchedMeta):
        check_tensor("tile_scheduler_metadata", tile_scheduler_metadata, dtype=torch.int32, shape=("num_rows", 3), device=q.device)
        sequences = batch if indices is None else batch * seq_len_q
        check_tensor("num_splits", num_splits, dtype=torch.int32, shape=(sequences + 1,), device=q.device)
        if backend.range_checks_enabled(q.device):
            check_range("tile_scheduler_metadata", tile_scheduler_metadata[:, 0], 0, sequences, ignore=-1)
            check_range("num_splits", num_splits, 0, tile_scheduler_metadata.shape[0] + 1)
        return (tile_scheduler_metadata, num_splits), None if extra_topk is None else make(extra_topk)
    if num_splits is not None:
        raise ValueError(f"num_splits must be None with a FlashMLASchedMeta; got {type(num_splits).__name__}")
    sched_meta = tile_scheduler_metadata
    config = FlashMLASchedMeta.Config(
        batch, seq_len_q, num_heads_q, k_cache.shape[1], num_heads_k, causal, is_fp8_kvcache, topk,
        None if extra_k_cache is None else extra_k_cache.shape[1], extra_topk,
    )
    if record_or_check(sched_meta, config):
        sched_meta.tile_scheduler_metadata, sched_meta.num_splits = make(topk)
        if extra_topk is not None:
            sched_meta.extra_tile_scheduler_metadata, sched_meta.extra_num_splits = make(extra_topk)
    extra_plan = None if extra_topk is None else (sched_meta.extra_tile_scheduler_metadata, sched_meta.extra_num_splits)
    return (sched_meta.tile_scheduler_metadata, sched_meta.num_splits), extra_plan


def _check_cache(name: str, cache: object, q: torch.Tensor, head_dim_v: int, is_fp8_kvcache: bool) -> None:
    """Check a (main or extra) KV cache of q's call."""
    head_dim = q.shape[-1]
    if not is_fp8_kvcache:
        check_tensor(name, cache, dtype=q.dtype, shape=("num_blocks", "page_block_size", "num_heads_k", head_dim), device=q.device)
    else:
        check_tensor(name, cache, dtype=(torch.float8_e4m3fn, torch.uint8),
                     shape=("num_blocks", "page_block_size", "num_heads_k", "bytes_per_token"), device=q.device)
        layout = fp8_layout(head_dim, head_dim_v, cache.shape[-1], name)
        num_heads_k, entry = cache.shape[2], cache.shape[3]
        if cache.stride(3) != 1 or (num_heads_k > 1 and cache.stride(2) != entry):
            raise ValueError(f"{name} must hold each token's entry contiguously (FP8 layouts); got strides {list(cache.stride())}")
        if layout == "model1" and (num_heads_k != 1 or cache.stride(1) != MODEL1_BYTES_PER_TOKEN):
            raise ValueError(
                f"{name} in the MODEL1 layout must have one KV head and each block contiguous "
                f"(stride {MODEL1_BYTES_PER_TOKEN} between tokens); got shape {list(cache.shape)}, strides {list(cache.stride())}"
            )
    if min(cache.shape) == 0:
        raise ValueError(f"{name} must have no empty dimension; got shape {list(cache.shape)}")


def _check_arguments(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache, indices) -> None:
    """Raise TypeError/ValueError naming the first bad argument of the core call."""
    check_tensor("q", q, dtype=(torch.bfloat16, torch.float16), shape=("batch", "seq_len_q", "num_heads_q", "head_dim"))
    batch, seq_len_q, num_heads_q, head_dim = q.shape
    if min(q.shape) == 0:
        raise ValueError(f"q must have no empty dimension; got shape {list(q.shape)}")
    device = q.device
    for name, flag in (("causal", causal), ("is_fp8_kvcache", is_fp8_kvcache)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool; got {type(flag).__name__}")
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, int):
        raise TypeError(f"head_dim_v must be an int; got {type(head_dim_v).__name__}")
    if not 0 < head_dim_v <= head_dim:
        raise ValueError(f"head_dim_v must be in [1, head_dim={head_dim}]; got {head_dim_v}")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real)):
        raise TypeError(f"softmax_scale must be a float or None; got {type(softmax_scale).__name__}")
    _check_cache("k_cache", k_cache, q, head_dim_v, is_fp8_kvcache)
    num_blocks, page_block_size, num_heads_k, _ = k_cache.shape
    if num_heads_q % num_heads_k:
        raise ValueError(
            f"num_heads_q ({num_heads_q}, q's dimension 2) must be a multiple of "
            f"num_heads_k ({num_heads_k}, k_cache's dimension 2)"
        )

    if indices is None:
        check_tensor("block_table", block_table, dtype=torch.int32, shape=(batch, "max_blocks_per_seq"), device=device)
        check_tensor("cache_seqlens", cache_seqlens, dtype=torch.int32, shape=(batch,), device=device)
        capacity = block_table.shape[1] * page_block_size
        check_range("cache_seqlens", cache_seqlens, 0, capacity + 1)
        if backend.range_checks_enabled(device):
            blocks_used = (cache_seqlens.long() + page_block_size - 1) // page_block_size
            used = torch.arange(block_table.shape[1], device=device)[None, :] < blocks_used[:, None]
            check_range("block_table", torch.where(used, block_table, 0), 0, num_blocks)  # entries past a sequence: anything
    else:
        _check_indices("indices", indices, q, k_cache)
        if causal:
            raise ValueError("causal must be False with indices (sparse attention selects its tokens itself)")


def _check_indices(name: str, indices: object, q: torch.Tensor, cache: torch.Tensor) -> None:
    batch, seq_len_q = q.shape[:2]
    check_tensor(name, indices, dtype=torch.int32, shape=(batch, seq_len_q, "topk"), device=q.device)
    if indices.shape[2] == 0:
        raise ValueError(f"{name} must have topk >= 1; got shape {list(indices.shape)}")
    check_range(name, indices, 0, cache.shape[0] * cache.shape[1], ignore=-1)


def _check_extras(q, k_cache, head_dim_v, is_fp8_kvcache, indices, attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length,
                  extra_topk_length) -> None:
    """Raise TypeError/ValueError naming the first bad argument among sparse decoding's extras."""
    given = [name for name, value in (("attn_sink", attn_sink), ("extra_k_cache", extra_k_cache),
                                      ("extra_indices_in_kvcache", extra_indices_in_kvcache), ("topk_length", topk_length),
                                      ("extra_topk_length", extra_topk_length)) if value is not None]
    if not given:
        return
    if indices is None:
        raise ValueError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} sparse attention (indices); got indices=None")
    batch, _, num_heads_q, _ = q.shape
    if attn_sink is not None:
        check_tensor("attn_sink", attn_sink, dtype=torch.float32, shape=(num_heads_q,), device=q.device)
    if (extra_k_cache is None) != (extra_indices_in_kvcache is None):
        raise ValueError("extra_k_cache and extra_indices_in_kvcache come together; got only "
                         + ("extra_k_cache" if extra_indices_in_kvcache is None else "extra_indices_in_kvcache"))
    if extra_topk_length is not None and extra_k_cache is None:
        raise ValueError("extra_topk_length needs extra_k_cache")
    if extra_k_cache is not None:
        _check_cache("extra_k_cache", extra_k_cache, q, head_dim_v, is_fp8_kvcache)
        if extra_k_cache.dtype != k_cache.dtype or extra_k_cache.shape[2:] != k_cache.shape[2:]:
            raise ValueError(
                f"extra_k_cache must have k_cache's dtype, heads and entry size ({k_cache.dtype}, {list(k_cache.shape[2:])}); "
                f"got {extra_k_cache.dtype}, {list(extra_k_cache.shape[2:])}"
            )
        _check_indices("extra_indices_in_kvcache", extra_indices_in_kvcache, q, extra_k_cache)
    for name, length, selected in (("topk_length", topk_length, indices), ("extra_topk_length", extra_topk_length, extra_indices_in_kvcache)):
        if length is not None:
            check_tensor(name, length, dtype=torch.int32, shape=(batch,), device=q.device)
            check_range(name, length, 0, selected.shape[-1] + 1)

