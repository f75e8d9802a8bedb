"""DeepSeek models wired through dsinfra's components.

- The demo's small DeepSeek-V3-style model: MLA attention, DeepSeekMoE with
  group-limited routing and auxiliary-loss-free balancing, a dense first layer.
- Real checkpoints in Hugging Face's format (DeepSeek-V2, V3, R1, V3.2):
  :func:`load_pretrained` (see :mod:`dsinfra.models.pretrained`).
"""

from dsinfra.models.checkpoint_config import CheckpointError
from dsinfra.models.config import ModelArgs
from dsinfra.models.kv_cache import PagedKVCache
from dsinfra.models.moe import MoE, Gate, Experts
from dsinfra.models.pretrained import PretrainedModel, load_pretrained
from dsinfra.models.tasks import IGNORE, SortTask
from dsinfra.models.transformer import Block, Transformer

__all__ = [
    "Block", "CheckpointError", "Experts", "Gate", "IGNORE", "ModelArgs", "MoE", "PagedKVCache", "PretrainedModel",
    "SortTask", "Transformer", "load_pretrained",
]
