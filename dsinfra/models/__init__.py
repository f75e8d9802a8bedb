"""A small DeepSeek-V3-style model: MLA attention, DeepSeekMoE with
group-limited routing and auxiliary-loss-free balancing, a dense first layer."""

from dsinfra.models.config import ModelArgs
from dsinfra.models.kv_cache import PagedKVCache
from dsinfra.models.moe import MoE, Gate, Experts
from dsinfra.models.tasks import IGNORE, SortTask
from dsinfra.models.transformer import Block, Transformer

__all__ = ["Block", "Experts", "Gate", "IGNORE", "ModelArgs", "MoE", "PagedKVCache", "SortTask", "Transformer"]
