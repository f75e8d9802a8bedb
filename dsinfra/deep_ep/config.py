"""``Config``: upstream's tuning knobs for normal-mode dispatch and combine.

Upstream's kernels stream tokens through per-peer queues of
``num_sms / 2`` channels x ``num_max_*_chunked_recv_tokens`` tokens; the
``*_send_tokens`` fields tune how many go per chunk. Here a transfer is one
``torch.distributed`` collective, so the chunk sizes change nothing about how
data moves. What keeps its meaning is the size hint: a buffer of
``get_nvl_buffer_size_hint(hidden_bytes, num_ranks)`` bytes lets one call bring
``num_sms / 2 * num_max_nvl_chunked_recv_tokens`` tokens from every peer (2,560
with the defaults), and :class:`~dsinfra.deep_ep.Buffer` refuses a call that
would receive more than its buffer holds.
"""

from __future__ import annotations

import dataclasses

from dsinfra.validation import check_positive

# Upstream's bounds on the per-token metadata that rides along with a token:
# up to 128 top-k entries (an int64 index and a float32 weight each) and up to
# 128 float32 FP8 scales.
MAX_TOPK = 128
MAX_SCALES = 128
METADATA_BYTES_PER_TOKEN = MAX_TOPK * (8 + 4) + MAX_SCALES * 4


@dataclasses.dataclass(frozen=True)
class Config:
    """Tuning knobs for one normal-mode dispatch or combine (upstream's ``deep_ep.Config``)."""

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self) -> None:
        check_positive("num_sms", self.num_sms, allow_zero=True)
        for kind in ("nvl", "rdma"):
            send = check_positive(f"num_max_{kind}_chunked_send_tokens", getattr(self, f"num_max_{kind}_chunked_send_tokens"))
            recv = check_positive(f"num_max_{kind}_chunked_recv_tokens", getattr(self, f"num_max_{kind}_chunked_recv_tokens"))
            if send >= recv:
                raise ValueError(
                    f"num_max_{kind}_chunked_send_tokens ({send}) must be < num_max_{kind}_chunked_recv_tokens ({recv})"
                )

    @property
    def num_channels(self) -> int:
        return max(self.num_sms // 2, 1)

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of ``num_nvl_bytes`` that let one call receive
        ``num_channels * num_max_nvl_chunked_recv_tokens`` tokens of
        ``hidden_bytes`` (plus their top-k entries and scales) from each of
        ``num_ranks`` peers within a node."""
        return self._hint(hidden_bytes, num_ranks, self.num_max_nvl_chunked_recv_tokens)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of ``num_rdma_bytes`` that let one hierarchical call receive
        ``num_channels * num_max_rdma_chunked_recv_tokens`` tokens from each of
        ``num_ranks`` peers on other nodes."""
        return self._hint(hidden_bytes, num_ranks, self.num_max_rdma_chunked_recv_tokens)

    def _hint(self, hidden_bytes: int, num_ranks: int, recv_tokens: int) -> int:
        check_positive("hidden_bytes", hidden_bytes)
        check_positive("num_ranks", num_ranks)
        num_bytes = num_ranks * self.num_channels * recv_tokens * (hidden_bytes + METADATA_BYTES_PER_TOKEN)
        return -(-num_bytes // 128) * 128
