"""Seeded data generators: the same seed gives the same data on every machine.

Each takes a ``seed`` and draws from its own ``torch.Generator`` on the CPU,
then moves the result to ``device``, so results never depend on the global RNG
or on the device.
"""

from __future__ import annotations

import torch


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal values of ``shape``, drawn in float32 then cast to ``dtype``."""
    return torch.randn(*shape, generator=generator(seed), dtype=torch.float32).to(device=device, dtype=dtype)


def seq_lengths(
    batch: int, mean: int, *, seed: int, varlen: bool = True, minimum: int = 1, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``[batch]`` int32 sequence lengths around ``mean``: all equal to ``mean``,
    or with ``varlen`` drawn from a normal of that mean (std mean/2, at least
    ``minimum``), as FlashMLA's tests draw them."""
    if not varlen:
        return torch.full((batch,), max(mean, minimum), dtype=torch.int32, device=device)
    lengths = torch.normal(float(mean), mean / 2, (batch,), generator=generator(seed), dtype=torch.float32)
    return lengths.round().clamp(min=minimum).to(device=device, dtype=torch.int32)


def topk_indices(
    num_tokens: int,
    num_experts: int,
    topk: int,
    *,
    seed: int,
    skew: float = 0.0,
    drop: float = 0.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[num_tokens, topk]`` int64 routing decisions: distinct experts per token.

    skew: 0 chooses experts uniformly; larger values favour low-numbered experts
        (expert e is drawn with weight ``(e + 1) ** -skew``), giving the uneven
        loads load balancers are for.
    drop: probability that an entry is -1 (no expert), as routers emit for
        dropped or padded tokens.
    """
    if topk > num_experts:
        raise ValueError(f"topk ({topk}) must be <= num_experts ({num_experts})")
    gen = generator(seed)
    weights = torch.arange(1, num_experts + 1, dtype=torch.float64).pow(-skew).expand(num_tokens, num_experts)
    idx = torch.multinomial(weights, topk, replacement=False, generator=gen) if num_tokens else torch.empty(0, topk, dtype=torch.int64)
    if drop > 0:
        idx = idx.masked_fill(torch.rand(idx.shape, generator=gen, dtype=torch.float32) < drop, -1)
    return idx.to(device)


def skewed_loads(num_layers: int, num_experts: int, *, seed: int, skew: float = 1.0) -> torch.Tensor:
    """``[num_layers, num_experts]`` float64 expert loads, each layer a shuffled
    Zipf-like profile (load of the i-th most popular expert ~ ``(i + 1) ** -skew``)
    scaled by a log-normal factor per expert, as real MoE routing statistics look."""
    gen = generator(seed)
    profile = torch.arange(1, num_experts + 1, dtype=torch.float64).pow(-skew)
    order = torch.argsort(torch.rand(num_layers, num_experts, generator=gen, dtype=torch.float32), dim=1)
    noise = torch.exp(0.3 * torch.randn(num_layers, num_experts, generator=gen, dtype=torch.float64))
    return profile[order] * noise * 1000.0
