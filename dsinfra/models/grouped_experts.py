"""The routed experts a rank holds, stacked, run as grouped GEMMs
(:class:`GroupedExperts`).

Each projection is one tensor over the experts: ``gate_proj`` and ``up_proj``
[num_experts, moe_intermediate, hidden], ``down_proj`` [num_experts, hidden,
moe_intermediate]; float, or FP8 with ``*_scale_inv`` [num_experts,
ceil(n/128), ceil(k/128)] as the checkpoints store each expert. FP8 and bf16
experts run through DeepGEMM's grouped GEMMs (FP8 inputs cast per token in
1x128 groups; ``m_grouped_bf16_gemm_nt_*`` for bf16):

- :meth:`GroupedExperts.forward`: the contiguous layout
  (:func:`dsinfra.deep_gemm.m_grouped_fp8_gemm_nt_contiguous`): the (token,
  expert) pairs sorted by expert, each expert's rows starting at a multiple of
  128; prefill, and decoding on one rank.
- :meth:`GroupedExperts.forward_masked`: the masked layout
  (:func:`dsinfra.deep_gemm.m_grouped_fp8_gemm_nt_masked`): what deep_ep's
  low-latency dispatch delivers, each expert's rows up to its count.

float32 and float16 experts (which DeepGEMM has no GEMM for) run one matmul per
expert; when running every expert on every token costs fewer FLOPs than
``DENSE_FLOPS`` (a decoding step of a small model), they run all at once
instead, as three matmuls: a loop over the experts would cost more in
per-operation overhead than the work it skips.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsinfra.fp8 import per_token_cast_to_fp8

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
DENSE_FLOPS = 1 << 24  # ~0.3 ms of float32 matmul on a laptop core: about what a loop over a few experts costs


class GroupedExperts(nn.Module):
    def __init__(self, weights: dict[str, torch.Tensor], scales: dict[str, torch.Tensor] | None = None):
        super().__init__()
        for name in PROJECTIONS:
            setattr(self, name, nn.Parameter(weights[name], requires_grad=False))
            scale = None if scales is None else nn.Parameter(scales[name], requires_grad=False)
            setattr(self, f"{name}_scale_inv", scale)

    @property
    def num_experts(self) -> int:
        return self.gate_proj.shape[0]

    @property
    def is_fp8(self) -> bool:
        return self.gate_proj_scale_inv is not None

    @property
    def uses_deep_gemm(self) -> bool:
        """FP8 or bf16 weights: DeepGEMM's grouped GEMMs serve them."""
        return self.is_fp8 or self.gate_proj.dtype == torch.bfloat16

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_k weights[t, k] * expert_{experts[t, k]}(x[t]) for every token.

        x: [num_tokens, hidden]; experts: [num_tokens, top-k] int64 ids into
        this set, -1 for experts held elsewhere; weights: [num_tokens, top-k].
        Returns [num_tokens, hidden] float32.
        """
        if not self.uses_deep_gemm and 6 * x.shape[0] * self.gate_proj.numel() <= DENSE_FLOPS:
            return self._float_dense(x, experts, weights)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        token, k = torch.nonzero(experts >= 0, as_tuple=True)
        if token.numel() == 0:
            return out
        expert = experts[token, k]
        order = torch.argsort(expert, stable=True)
        token, k, expert = token[order], k[order], expert[order]
        counts = torch.bincount(expert, minlength=self.num_experts)
        if self.uses_deep_gemm:
            y = self._contiguous(x[token], expert, counts)
        else:
            y = self._float_grouped(x[token], counts.tolist())
        out.index_add_(0, token, y.float() * weights[token, k, None].float())
        return out

    def _float_grouped(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows sorted by expert, ``counts[e]`` of them for expert e -> their outputs."""
        out = torch.empty_like(rows)
        start = 0
        for e, count in enumerate(counts):
            if count:
                piece = rows[start : start + count]
                hidden = F.silu(piece @ self.gate_proj[e].T) * (piece @ self.up_proj[e].T)
                torch.matmul(hidden, self.down_proj[e].T, out=out[start : start + count])
                start += count
        return out

    def _float_dense(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with every expert run on every token and weighted by
        its routing weight (0 where not chosen, or held elsewhere)."""
        num_experts, inter, hidden = self.gate_proj.shape
        gate = x @ self.gate_proj.reshape(-1, hidden).T  # [tokens, experts * inter]
        up = x @ self.up_proj.reshape(-1, hidden).T
        hidden_states = (F.silu(gate) * up).view(-1, num_experts, inter).transpose(0, 1)  # [experts, tokens, inter]
        y = torch.bmm(hidden_states, self.down_proj.transpose(1, 2))  # [experts, tokens, hidden]
        chosen = experts >= 0
        routing = torch.zeros(x.shape[0], num_experts, dtype=torch.float32, device=x.device)
        routing.scatter_add_(1, torch.where(chosen, experts, 0), torch.where(chosen, weights.float(), 0))
        return (y.float() * routing.T[:, :, None]).sum(0)

    def _contiguous(self, rows: torch.Tensor, expert: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """As :meth:`_float_grouped`, through DeepGEMM's contiguous layout: each
        expert's rows start at a multiple of its alignment, -1 marks the padding."""
        from dsinfra import deep_gemm

        alignment = deep_gemm.get_m_alignment_for_contiguous_layout()
        padded = (counts + alignment - 1) // alignment * alignment
        first_padded, first_sorted = padded.cumsum(0) - padded, counts.cumsum(0) - counts
        position = first_padded[expert] + torch.arange(expert.numel(), device=rows.device) - first_sorted[expert]
        m_sum = int(padded.sum())
        m_indices = torch.full((m_sum,), -1, dtype=torch.int32, device=rows.device)
        m_indices[position] = expert.to(torch.int32)
        laid_out = torch.zeros(m_sum, rows.shape[1], dtype=rows.dtype, device=rows.device)
        laid_out[position] = rows

        def gemm(name: str, lhs: torch.Tensor) -> torch.Tensor:
            weight = getattr(self, name)
            out = torch.empty(m_sum, weight.shape[1], dtype=torch.bfloat16, device=rows.device)
            if self.is_fp8:
                rhs = (weight, getattr(self, f"{name}_scale_inv"))
                deep_gemm.m_grouped_fp8_gemm_nt_contiguous(per_token_cast_to_fp8(lhs), rhs, out, m_indices)
            else:
                deep_gemm.m_grouped_bf16_gemm_nt_contiguous(lhs.to(torch.bfloat16), weight, out, m_indices)
            return out

        hidden = F.silu(gemm("gate_proj", laid_out).float()) * gemm("up_proj", laid_out).float()
        return gemm("down_proj", hidden)[position]

    def forward_masked(self, x, counts: torch.Tensor) -> torch.Tensor:
        """Every expert on its first ``counts[e]`` rows of ``x``.

        x: [num_experts, max_rows, hidden] bfloat16 (cast to FP8 here for FP8
        experts), or, for FP8 experts, an FP8 pair (float8_e4m3fn [num_experts,
        max_rows, hidden], float32 scales [num_experts, max_rows, hidden / 128]);
        counts: [num_experts] int32.
        Returns [num_experts, max_rows, hidden] bfloat16; rows past the counts
        hold anything.
        """
        if self.uses_deep_gemm:
            if self.is_fp8 and isinstance(x, torch.Tensor):
                x = per_token_cast_to_fp8(x)
            gate = self._masked("gate_proj", x, counts)
            up = self._masked("up_proj", x, counts)
            hidden = F.silu(gate.float()) * up.float()
            return self._masked("down_proj", per_token_cast_to_fp8(hidden) if self.is_fp8 else hidden.to(torch.bfloat16), counts)
        out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
        for e, count in enumerate(counts.tolist()):
            if count:
                rows = x[e, :count].to(self.gate_proj.dtype)
                hidden = F.silu(rows @ self.gate_proj[e].T) * (rows @ self.up_proj[e].T)
                out[e, :count] = hidden @ self.down_proj[e].T
        return out

    def _masked(self, name: str, x, counts: torch.Tensor) -> torch.Tensor:
        """One projection in the masked layout: x an FP8 pair or bf16 [num_experts, max_rows, k]."""
        from dsinfra import deep_gemm

        weight = getattr(self, name)
        num_experts, max_rows, _ = x[0].shape if self.is_fp8 else x.shape
        out = torch.empty(num_experts, max_rows, weight.shape[1], dtype=torch.bfloat16, device=weight.device)
        expected = max(1, int(counts.float().mean().ceil()))
        if self.is_fp8:
            deep_gemm.m_grouped_fp8_gemm_nt_masked(x, (weight, getattr(self, f"{name}_scale_inv")), out, counts, expected)
        else:
            deep_gemm.m_grouped_bf16_gemm_nt_masked(x, weight, out, counts, expected)
        return out

