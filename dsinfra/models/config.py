"""The sizes of a DeepSeek-V3-style model."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """Sizes of the model; the defaults train on a CPU in minutes.

    DeepSeek-V3's own values, for scale: dim 7168, 61 layers (3 dense), 128
    heads, q_lora_rank 1536, kv_lora_rank 512, qk_nope_head_dim 128,
    qk_rope_head_dim 64, v_head_dim 128, 256 routed experts in 8 groups, top-8
    limited to 4 groups, 1 shared expert, moe_inter_dim 2048.
    """

    vocab_size: int = 64
    dim: int = 256
    n_layers: int = 4
    n_dense_layers: int = 1  # the first layers use a dense MLP instead of MoE
    n_heads: int = 8
    q_lora_rank: int = 0  # 0: queries are projected directly, without a low-rank bottleneck
    kv_lora_rank: int = 128  # width of the compressed KV latent (what the cache stores)
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 64  # the decoupled RoPE part, shared by all heads in the cache
    v_head_dim: int = 32
    inter_dim: int = 512  # dense MLP width
    moe_inter_dim: int = 128  # width of each expert
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    n_activated_experts: int = 4  # top-k
    n_expert_groups: int = 4
    n_limited_groups: int = 2  # a token's experts come from at most this many groups
    route_scale: float = 1.0
    bias_update_speed: float = 1e-3  # the auxiliary-loss-free balancing step (gamma)
    max_seq_len: int = 256
    rope_theta: float = 10000.0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value < 0 or (value == 0 and field.name not in ("q_lora_rank", "n_dense_layers", "n_shared_experts", "bias_update_speed")):
                raise ValueError(f"{field.name} must be positive; got {value}")
        if self.n_dense_layers > self.n_layers:
            raise ValueError(f"n_dense_layers ({self.n_dense_layers}) must be <= n_layers ({self.n_layers})")
        if self.n_routed_experts % self.n_expert_groups:
            raise ValueError(
                f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_expert_groups ({self.n_expert_groups})"
            )
        per_group = self.n_routed_experts // self.n_expert_groups
        if not 1 <= self.n_limited_groups <= self.n_expert_groups:
            raise ValueError(f"n_limited_groups must be in [1, n_expert_groups]; got {self.n_limited_groups}")
        if self.n_activated_experts > self.n_limited_groups * per_group:
            raise ValueError(
                f"n_activated_experts ({self.n_activated_experts}) must be <= n_limited_groups x experts per group "
                f"({self.n_limited_groups * per_group})"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even; got {self.qk_rope_head_dim}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.n_dense_layers
