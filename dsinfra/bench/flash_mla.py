"""FlashMLA decoding (576/512 heads, paged cache of 64-token blocks) against the per-sequence float32 reference.

FlashMLA's benchmark shapes (batch 128, mean length 4096..32768, 128 query
heads, seq_len_q 1 and 2, variable lengths, causal) scaled to the device: on a
CPU, batches of 8..32 and mean lengths of 1024..4096. FLOPs and bytes are
counted as FlashMLA's tests count them: ``2 * (head_dim + head_dim_v)`` FLOPs
per query head per attended token (the mean cache length; the causal mask is
not subtracted), and bytes for q, the attended KV tokens once (576 bf16
values, or 656 bytes in the FP8 layout) and the output. 128 heads are
compute-bound (about 240 FLOPs per byte), 16 heads memory-bound.

On a CPU, the bf16 dense cases also time PyTorch's own fused CPU flash attention
(``aten::_scaled_dot_product_flash_attention_for_cpu``, AMX matmuls with float32
scores) on the same query rows over the same keys laid out contiguously, padded
to the longest sequence and masked, with nothing to gather: ``sdpa_ms`` and
``vs_torch_sdpa`` (above 1: dsinfra is faster).
"""

from __future__ import annotations

HEAD_DIM, HEAD_DIM_V, PAGE_BLOCK_SIZE = 576, 512, 64

# (batch, mean length, query heads, seq_len_q, variable lengths, causal, FP8 cache, sparse topk)
CPU_CASES = [
    (16, 1024, 128, 1, True, False, False, None),
    (16, 1024, 128, 2, True, True, False, None),
    (4, 4096, 128, 1, False, False, False, None),
    (4, 4096, 128, 2, True, True, False, None),
    (32, 1024, 16, 1, True, False, False, None),
    (32, 1024, 64, 2, False, True, False, None),
    (16, 1024, 128, 1, True, False, True, None),
    (16, 2048, 128, 2, True, False, True, 512),
]
GPU_CASES = [
    (batch, mean, heads, seq_len_q, True, True, False, None)
    for batch, heads in ((128, 128), (128, 16))
    for seq_len_q in (1, 2)
    for mean in (4096, 8192)
] + [(128, 4096, 128, 2, True, False, True, None), (128, 8192, 128, 2, True, False, True, 2048)]
QUICK_CASES = [(4, 256, 128, 2, True, True, False, None), (4, 256, 16, 1, True, False, True, 64)]


def decoding_inputs(batch, mean, heads, seq_len_q, varlen, topk, device, seed=0):
    """q, a bf16 paged cache with shuffled blocks, the block table, the lengths and (sparse) indices."""
    import torch

    from dsinfra.testing import generator, randn, seq_lengths

    lengths = seq_lengths(batch, mean, seed=seed, varlen=varlen, minimum=seq_len_q)
    blocks = (lengths.long() + PAGE_BLOCK_SIZE - 1) // PAGE_BLOCK_SIZE
    num_blocks = int(blocks.sum())
    order = torch.randperm(num_blocks, generator=generator(seed)).int()
    block_table = torch.zeros(batch, int(blocks.max()), dtype=torch.int32)
    starts = torch.cumsum(blocks, 0) - blocks
    for b in range(batch):
        block_table[b, : blocks[b]] = order[starts[b] : starts[b] + blocks[b]]
    q = randn(batch, seq_len_q, heads, HEAD_DIM, seed=seed + 1, dtype=torch.bfloat16, device=device)
    k_cache = randn(num_blocks, PAGE_BLOCK_SIZE, 1, HEAD_DIM, seed=seed + 2, dtype=torch.bfloat16, device=device)
    indices = None
    if topk is not None:  # random tokens of each sequence, as slots
        tokens = (torch.rand(batch, seq_len_q, topk, generator=generator(seed + 3)) * lengths[:, None, None]).long()
        rows = torch.arange(batch)[:, None, None]
        indices = (block_table[rows, tokens // PAGE_BLOCK_SIZE] * PAGE_BLOCK_SIZE + tokens % PAGE_BLOCK_SIZE).int().to(device)
    return q, k_cache, block_table.to(device), lengths.to(device), indices


def torch_sdpa_call(q, k_cache, block_table, cache_seqlens, causal):
    """PyTorch's fused CPU flash attention on the inputs of one case, keys gathered
    beforehand: the query rows of each sequence (seq_len_q x heads) over its keys,
    V being the keys' first 512 channels (the kernel takes V as wide as K, and its
    extra output channels are dropped, as dsinfra's CPU path does)."""
    import torch

    batch, seq_len_q, heads, head_dim = q.shape
    longest = int(cache_seqlens.max())
    position = torch.arange(longest)
    slots = block_table[:, position // PAGE_BLOCK_SIZE].long() * PAGE_BLOCK_SIZE + position % PAGE_BLOCK_SIZE
    keys = k_cache.view(-1, head_dim)[slots][:, None]  # [batch, 1, longest, head_dim]
    before_last = (seq_len_q - 1 - torch.arange(seq_len_q)) if causal else torch.zeros(seq_len_q, dtype=torch.long)
    last = cache_seqlens.long()[:, None] - 1 - before_last  # [batch, seq_len_q]: the last key each query sees
    hidden = position > last[:, :, None, None]  # [batch, seq_len_q, 1, longest]
    mask = torch.zeros(hidden.shape, dtype=q.dtype).masked_fill_(hidden, float("-inf"))
    mask = mask.expand(batch, seq_len_q, heads, longest).reshape(batch, 1, seq_len_q * heads, longest)
    rows = q.reshape(batch, 1, seq_len_q * heads, head_dim)
    fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return lambda: fused(rows, keys, keys, 0.0, False, attn_mask=mask, scale=head_dim**-0.5)


def benchmark(ctx):
    import torch

    from dsinfra import flash_mla
    from dsinfra.flash_mla import reference

    cases = QUICK_CASES if ctx.quick else GPU_CASES if ctx.device.type == "cuda" else CPU_CASES
    for batch, mean, heads, seq_len_q, varlen, causal, fp8, topk in cases:
        q, k_cache, block_table, cache_seqlens, indices = decoding_inputs(batch, mean, heads, seq_len_q, varlen, topk, ctx.device)
        if fp8:
            k_cache = flash_mla.quantize_k_cache(k_cache, HEAD_DIM_V)
        plan = flash_mla.get_mla_metadata(cache_seqlens, seq_len_q * heads, 1, heads, fp8, topk)
        args = (q, k_cache, block_table, cache_seqlens, HEAD_DIM_V, *plan)
        options = dict(causal=causal, is_fp8_kvcache=fp8, indices=indices)
        attended = topk * seq_len_q if topk else float(cache_seqlens.float().mean()) * seq_len_q  # per batch entry, all its queries
        kv_bytes = (656 if fp8 else 2 * HEAD_DIM) * (topk * seq_len_q if topk else attended / seq_len_q)
        flops = batch * heads * attended * 2 * (HEAD_DIM + HEAD_DIM_V)
        moved = batch * (seq_len_q * heads * 2 * (HEAD_DIM + HEAD_DIM_V) + kv_bytes)
        name = (f"b={batch} s_k={mean}{'~' if varlen else ''} h={heads} s_q={seq_len_q}"
                + (" causal" if causal else "") + (" fp8" if fp8 else "") + (f" topk={topk}" if topk else ""))
        result = ctx.measure(
            name,
            lambda: flash_mla.flash_mla_with_kvcache(*args, **options),
            baseline=lambda: reference.flash_mla_with_kvcache(*args, HEAD_DIM**-0.5, **options),
            baseline_name="reference",
            baseline_repeats=2,
            flops=flops,
            bytes=moved,
            params=dict(batch=batch, mean_seqlen=mean, heads=heads, seq_len_q=seq_len_q, varlen=varlen,
                        causal=causal, fp8=fp8, topk=topk, head_dim=HEAD_DIM, head_dim_v=HEAD_DIM_V),
        )
        if ctx.device.type == "cpu" and not fp8 and topk is None:
            sdpa = ctx.time(torch_sdpa_call(q, k_cache, block_table, cache_seqlens, causal)).median
            result.extra.update(sdpa_ms=sdpa * 1e3, vs_torch_sdpa=sdpa / result.time_s)
        del q, k_cache, args
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
