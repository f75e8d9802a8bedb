"""The pieces under the Buffer, in one process: byte rows, events, the
topology and traffic accounting, Config and the size hints."""

from __future__ import annotations

import pytest
import torch

from dsinfra.deep_ep import Config, EventHandle, EventOverlap, Traffic, threads
from dsinfra.deep_ep.comm import Topology, group_topology
from dsinfra.deep_ep.low_latency import size_hint
from dsinfra.deep_ep.normal import send_order, true_positions
from dsinfra.deep_ep.rows import RowFormat
from dsinfra.fp8 import per_token_cast_to_fp8
from dsinfra.testing import randn


def test_rows_round_trip_every_dtype_and_reorder():
    x = randn(5, 7, seed=0, dtype=torch.bfloat16)
    x_fp8, scales = per_token_cast_to_fp8(randn(5, 256, seed=1))
    idx = torch.arange(15).view(5, 3)
    mask = torch.rand(5, 4) > 0.5
    fields = [x, x_fp8, scales, idx, mask]
    fmt = RowFormat(fields)
    assert fmt.row_bytes == 7 * 2 + 256 + 2 * 4 + 3 * 8 + 4
    order = torch.tensor([3, 0, 4])
    rows = fmt.pack(fields, order)
    assert rows.dtype == torch.uint8 and rows.shape == (3, fmt.row_bytes)
    outputs = fmt.empty(3, torch.device("cpu"))
    fmt.unpack_into(rows, outputs)
    for got, want in zip(outputs, fields):
        assert torch.equal(got.view(torch.uint8), want[order].view(torch.uint8))
    back = fmt.empty(3, torch.device("cpu"))
    fmt.unpack_into(rows, back, index=torch.tensor([2, 1, 0]))
    assert torch.equal(back[0], x[order.flip(0)])


def test_a_single_field_arrives_in_place():
    x = randn(4, 6, seed=2, dtype=torch.bfloat16)
    fmt = RowFormat([x])
    outputs = fmt.empty(4, torch.device("cpu"))
    buffer = fmt.receive_buffer(outputs)
    assert buffer.data_ptr() == outputs[0].data_ptr()  # the transfer writes straight into the output
    buffer.copy_(fmt.pack([x]))
    fmt.unpack_into(buffer, outputs)
    assert torch.equal(outputs[0], x)
    rows = fmt.pack([x])
    assert fmt.unpack(rows)[0].data_ptr() == rows.data_ptr()  # a view, no copy


def test_send_order_is_destination_major_then_token():
    in_rank = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)
    assert send_order(in_rank, 5).tolist() == [0, 2, 2, 0, 1]
    assert true_positions(torch.tensor([False, True, True, False]), 2).tolist() == [1, 2]
    assert send_order(torch.zeros(0, 3, dtype=torch.bool), 0).tolist() == []


def test_events_complete_once_in_order():
    calls = []

    class Work:
        def wait(self):
            calls.append("wait")

    event = EventOverlap(EventHandle([Work()], lambda: calls.append("finish")))
    assert not event.event.done
    with event:
        calls.append("overlapped")
    event.current_stream_wait()
    assert calls == ["overlapped", "wait", "finish"]
    assert event.event.done
    EventOverlap().current_stream_wait()  # nothing to wait for


def test_topology_and_traffic():
    topology = Topology(rank=5, num_ranks=8, num_ranks_per_node=4)
    assert topology.num_nodes == 2 and topology.node(5) == 1 and topology.local(5) == 1
    assert list(topology.node_ranks(0)) == [0, 1, 2, 3]
    traffic = Traffic()
    traffic.add(topology, [1, 0, 2, 0, 3, 10, 4, 0], 100)  # 10 rows to itself are not sent
    assert (traffic.intranode_bytes, traffic.internode_bytes) == (700, 300)
    traffic.reset()
    assert (traffic.intranode_bytes, traffic.internode_bytes) == (0, 0)


class FakeGroup:
    def __init__(self, rank: int, size: int):
        self.rank, self.size = (lambda: rank), (lambda: size)


@pytest.mark.parametrize("size, per_node", [(4, 4), (8, 8), (16, 8), (24, 8), (12, 12)])
def test_without_local_world_size_nodes_follow_upstreams_nvlink_domains(monkeypatch, size, per_node):
    """Upstream's tests start 8 ranks on each node themselves (no torchrun): a group of
    more than 8 ranks that 8 divides sits 8 to a node, a smaller one on one node."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert group_topology(FakeGroup(3, size), None).num_ranks_per_node == per_node
    assert group_topology(FakeGroup(3, size), size).num_ranks_per_node == size  # the argument decides


def test_config_hints():
    config = Config()
    assert config.num_channels == 10
    hidden_bytes = 7168 * 2
    hint = config.get_nvl_buffer_size_hint(hidden_bytes, 8)
    assert hint % 128 == 0 and hint >= 8 * 10 * 256 * hidden_bytes
    assert config.get_rdma_buffer_size_hint(hidden_bytes, 8) == hint  # the same recv tokens by default
    with pytest.raises(ValueError, match="num_max_rdma_chunked_send_tokens"):
        Config(20, 6, 256, 128, 128)
    with pytest.raises(TypeError, match="num_sms must be an int"):
        Config(2.5)


def test_low_latency_size_hint_covers_both_directions():
    hint = size_hint(128, 7168, 8, 256)
    rows = 8 * 128
    assert hint % 128 == 0
    assert hint >= rows * (7168 + 56 * 4 + 256)  # FP8 dispatch
    assert hint >= rows * (2 * 7168 + 4 * 32)  # bf16 combine with weights


def test_fair_share_of_cores_only_when_oversubscribed():
    # 4 ranks on host 7 with 2 threads each, 2 cores: 1 thread each; another host's ranks do not count
    assert threads.fair_share(7, [7, 7, 7, 7, 9], [2, 2, 2, 2, 64], cores=2) == 1
    assert threads.fair_share(7, [7, 7, 9, 9], [8, 8, 8, 8], cores=16) is None  # 16 threads on 16 cores
    assert threads.fair_share(7, [7, 7, 7], [8, 8, 8], cores=16) == 5
    before = torch.get_num_threads()
    with threads.at_most(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with threads.at_most(None):
        assert torch.get_num_threads() == before
