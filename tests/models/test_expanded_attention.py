"""expanded_attention gives the attention of the unpadded q, k, v (computed
here in float64), whichever of the widths is larger, causal or masked, and in
the input's dtype."""

import pytest
import torch

from dsinfra.models.expanded_attention import expanded_attention


def reference(q, k, v, scale, mask):
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    length = q.shape[-2]
    allowed = torch.ones(length, length, dtype=torch.bool).tril() if mask is None else mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v.double()


@pytest.mark.parametrize("qk_dim, v_dim", [(24, 16), (16, 24), (32, 32)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_unpadded_attention(qk_dim, v_dim, masked, dtype):
    g = torch.Generator().manual_seed(qk_dim + v_dim)
    q, k = (torch.randn(2, 3, 37, qk_dim, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(2, 3, 37, v_dim, generator=g).to(dtype)
    mask = None
    if masked:  # causal, and some earlier keys hidden; every row keeps its own key
        mask = torch.ones(37, 37, dtype=torch.bool).tril() & (torch.rand(37, 37, generator=g) < 0.7)
        mask |= torch.eye(37, dtype=torch.bool)
    out = expanded_attention(q, k, v, 0.3, mask)
    assert out.shape == (2, 3, 37, v_dim) and out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), reference(q, k, v, 0.3, mask), atol=tolerance, rtol=tolerance)
