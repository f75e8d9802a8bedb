"""The linear layer of a loaded checkpoint: a float weight, or an FP8 one in
DeepSeek's 128x128 blocks that stays FP8 (:class:`Linear`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsinfra.fp8 import per_block_cast_back, per_token_cast_to_fp8


class Linear(nn.Module):
    """``y = x @ weight.T``, bias-free, for inference.

    weight: [out_features, in_features], float32, bfloat16 or float16; or
        float8_e4m3fn with ``weight_scale_inv`` [ceil(out/128), ceil(in/128)]
        float32, one per 128x128 block (``weight ≈ weight.float() * scale``; the
        checkpoints' name for it, though it multiplies).

    FP8 weights run through :func:`dsinfra.deep_gemm.fp8_gemm_nt`: the input is
    cast per token in 1x128 groups (DeepSeek's dynamic activation scheme), the
    output comes in x's dtype (computed in float32, or bf16 for bf16 inputs).
    """

    def __init__(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale_inv = None if weight_scale_inv is None else nn.Parameter(weight_scale_inv, requires_grad=False)

    @property
    def is_fp8(self) -> bool:
        return self.weight_scale_inv is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_fp8:
            return F.linear(x, self.weight)
        from dsinfra import deep_gemm

        rows = x.reshape(-1, x.shape[-1])
        out_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
        out = torch.empty(rows.shape[0], self.weight.shape[0], dtype=out_dtype, device=x.device)
        if rows.shape[0]:
            deep_gemm.fp8_gemm_nt(per_token_cast_to_fp8(rows), (self.weight, self.weight_scale_inv), out)
        return out.to(x.dtype).view(*x.shape[:-1], self.weight.shape[0])

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in ``dtype`` (a new tensor for FP8 weights: used for small
        weights only, such as the one MLA absorbs into its queries)."""
        if not self.is_fp8:
            return self.weight.to(dtype)
        return per_block_cast_back(self.weight, self.weight_scale_inv, dtype)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        kind = "fp8 128x128 blocks" if self.is_fp8 else str(self.weight.dtype).replace("torch.", "")
        return f"in_features={in_features}, out_features={out_features}, {kind}"
