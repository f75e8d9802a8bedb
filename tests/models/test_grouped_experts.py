"""The routed experts of a loaded checkpoint, against a per-token loop."""

import pytest
import torch
import torch.nn.functional as F

from dsinfra.models import grouped_experts
from dsinfra.models.grouped_experts import GroupedExperts


def per_token(experts_module: GroupedExperts, x, experts, weights):
    out = torch.zeros(x.shape, dtype=torch.float64)
    w = {name: getattr(experts_module, name).double() for name in grouped_experts.PROJECTIONS}
    for t in range(x.shape[0]):
        for k in range(experts.shape[1]):
            e = int(experts[t, k])
            if e >= 0:
                row = x[t].double()
                hidden = F.silu(w["gate_proj"][e] @ row) * (w["up_proj"][e] @ row)
                out[t] += float(weights[t, k]) * (w["down_proj"][e] @ hidden)
    return out


@pytest.mark.parametrize("path", ["dense", "per-expert"])
@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_float_experts(monkeypatch, path, tokens):
    """All experts at once (small problems) or one matmul per expert: the same
    sums, with experts held elsewhere (-1), experts no token chose, and one
    token choosing an expert twice."""
    monkeypatch.setattr(grouped_experts, "DENSE_FLOPS", 1 << 40 if path == "dense" else 0)
    g = torch.Generator().manual_seed(tokens)
    num_experts, inter, hidden, top_k = 6, 24, 40, 3
    module = GroupedExperts({
        "gate_proj": torch.randn(num_experts, inter, hidden, generator=g) / hidden**0.5,
        "up_proj": torch.randn(num_experts, inter, hidden, generator=g) / hidden**0.5,
        "down_proj": torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5,
    })
    x = torch.randn(tokens, hidden, generator=g)
    experts = torch.randint(-1, num_experts - 2, (tokens, top_k), generator=g)  # the last two experts: never chosen
    experts[0, :2] = 1  # chosen twice by token 0
    weights = torch.rand(tokens, top_k, generator=g)
    out = module(x, experts, weights)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), per_token(module, x, experts, weights), rtol=1e-5, atol=1e-5)
