"""FP8 training of linear layers, as DeepSeek-V3 trains: :class:`FP8Linear` and
its autograd function :class:`FP8LinearFunction`.

All three GEMMs of a linear layer take FP8 operands, each scaled in groups of 128
along the dimension the GEMM reduces over, and write bf16 or float32:

| GEMM | computes | LHS, 1x128 scaled along K | RHS |
| --- | --- | --- | --- |
| forward | ``y = x @ W.T`` | x, per token over in_features | W, 128x128 blocks |
| input gradient | ``dx = dy @ W`` | dy, per token over out_features | W.T: the forward's blocks, transposed |
| weight gradient | ``dW = dy.T @ x`` | dy.T, per output feature over 128 tokens | x.T, per input feature over 128 tokens |

The weight is cast once per forward and its FP8 copy reused by the backward
(128x128 blocks transpose into 128x128 blocks); the input is kept as given for
the weight gradient, which needs it scaled along the tokens instead.
"""

from __future__ import annotations

import torch

from dsinfra import deep_gemm
from dsinfra.fp8 import GROUP, per_block_cast_to_fp8, per_token_cast_to_fp8
from dsinfra.validation import check_tensor

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _gemm_nt(lhs: torch.Tensor, rhs: tuple[torch.Tensor, torch.Tensor], out_dtype: torch.dtype, recipe) -> torch.Tensor:
    """FP8 ``lhs @ rhs.T``: lhs [m, k] float is cast per token; rhs is an FP8 pair."""
    out = torch.empty(lhs.shape[0], rhs[0].shape[0], dtype=out_dtype, device=lhs.device)
    deep_gemm.fp8_gemm_nt(per_token_cast_to_fp8(lhs), rhs, out, recipe=recipe)
    return out


class FP8LinearFunction(torch.autograd.Function):
    """``y = x @ weight.T + bias`` with the forward and both backward GEMMs in FP8.

    x: [..., in_features], float32, bfloat16 or float16; y and dx come in its dtype.
    weight: [out_features, in_features]; bias: [out_features] or None.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        check_tensor("x", x, dtype=_FLOAT_DTYPES, device=weight.device)
        check_tensor("weight", weight, dtype=_FLOAT_DTYPES, ndim=2)
        out_features, in_features = weight.shape
        if x.dim() == 0 or x.shape[-1] != in_features:
            raise ValueError(f"x must have shape [..., {in_features}] (in_features); got {list(x.shape)}")
        if bias is not None:
            check_tensor("bias", bias, shape=(out_features,), device=weight.device)
        tokens = x.reshape(-1, in_features)
        weight_fp8 = per_block_cast_to_fp8(weight)
        y = _gemm_nt(tokens, weight_fp8, torch.bfloat16, (1, GROUP, GROUP)).to(x.dtype)
        if bias is not None:
            y += bias.to(y.dtype)
        ctx.save_for_backward(tokens, *weight_fp8)
        ctx.input_shape = x.shape
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        tokens, weight_fp8, weight_scales = ctx.saved_tensors
        grad_tokens = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight_t = (weight_fp8.T.contiguous(), weight_scales.T)
            grad_x = _gemm_nt(grad_tokens, weight_t, torch.bfloat16, (1, GROUP, GROUP))
            grad_x = grad_x.to(tokens.dtype).view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            if tokens.shape[0] == 0:
                grad_weight = torch.zeros(weight_fp8.shape, dtype=ctx.weight_dtype, device=tokens.device)
            else:
                # cast along the tokens: transposed first, as casts read rows fast and strided columns slowly
                tokens_t = per_token_cast_to_fp8(tokens.T.contiguous())
                grad_weight = _gemm_nt(grad_tokens.T.contiguous(), tokens_t, torch.float32, (1, 1, GROUP))
                grad_weight = grad_weight.to(ctx.weight_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_tokens.sum(dim=0).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias


class FP8Linear(torch.nn.Linear):
    """A drop-in ``torch.nn.Linear`` whose GEMMs run in FP8 (:class:`FP8LinearFunction`).

    Any in/out features work (multiples of 16 suit DeepGEMM on GPUs), and any
    number of tokens, none included. Parameters keep their dtype (float32 master
    weights by default); outputs come in the input's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FP8LinearFunction.apply(x, self.weight, self.bias)
