"""``Buffer``: DeepEP's expert-parallel communication API over a process group.

Normal mode (training, prefill): :meth:`Buffer.get_dispatch_layout`,
:meth:`Buffer.dispatch`, :meth:`Buffer.combine`, within one node
(:mod:`~dsinfra.deep_ep.normal`) or across nodes
(:mod:`~dsinfra.deep_ep.hierarchical`). Low-latency mode (decoding):
:meth:`Buffer.low_latency_dispatch`, :meth:`Buffer.low_latency_combine`
(:mod:`~dsinfra.deep_ep.low_latency`). Upstream's names, signatures and
return tuples; ``torch.distributed`` underneath (gloo on CPUs, NCCL on GPUs).

Buffer sizes are limits, not allocations: a call that would receive more
bytes than the rank's ``num_nvl_bytes`` (within a node), ``num_rdma_bytes``
(from other nodes, or anything in low-latency mode) raises ValueError on
every rank before any token moves.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.distributed as dist

from dsinfra import backend
from dsinfra.deep_ep import hierarchical, low_latency, normal, threads
from dsinfra.deep_ep.checks import (
    DTYPE_CODES,
    HIDDEN_DTYPES,
    check_bytes,
    check_flag,
    check_layout_against_topk,
    check_token_fields,
    describe,
    exchange_verdicts,
    run_checks,
)
from dsinfra.deep_ep.comm import Comm, Traffic, group_topology
from dsinfra.deep_ep.config import Config
from dsinfra.deep_ep.event import EventHandle, EventOverlap, capture
from dsinfra.deep_ep.handles import DispatchHandle, Layout, LowLatencyHandle, public_handle
from dsinfra.deep_ep.plan import check_agreement, check_capacity, exchange_counts, exchange_expert_counts, raise_problems
from dsinfra.deep_ep.rows import RowFormat
from dsinfra.fp8 import GROUP
from dsinfra.validation import check_divisible, check_positive, check_range, check_tensor

# What a normal-mode dispatch's ranks must agree on (the fixed part of the count exchange).
_DISPATCH_SIGNATURE = ("hidden", "x dtype", "num_topk", "num_experts")
# What the ranks tell each other when they create a Buffer.
_BUFFER_SIZES = ("num_nvl_bytes", "num_rdma_bytes", "host", "threads", "low_latency_mode", "num_ranks_per_node")


def _sharing_cores(method):
    """Run a Buffer method with the rank's fair share of its host's cores (see :mod:`~dsinfra.deep_ep.threads`)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with threads.at_most(self._fair_threads):
            return method(self, *args, **kwargs)

    return wrapper


class Buffer:
    """The expert-parallel communication buffer of one rank of ``group``.

    Attributes:
        num_sms: upstream's SM budget of the normal kernels (class-wide); it
            feeds the :class:`Config` defaults and changes nothing else here.
        rank, group_size, group: this rank, the group's size, the group.
        num_nvl_bytes, num_rdma_bytes: the limits on what one call may
            receive within a node, and from other nodes or in low-latency mode.
        low_latency_mode: whether the low-latency calls are enabled.
        explicitly_destroy, enable_shrink: as given (see :meth:`destroy`).
        num_nodes, num_ranks_per_node: the group's layout (see
            :mod:`~dsinfra.deep_ep.comm`); more than one node makes normal
            mode hierarchical.
        traffic: payload bytes this rank has sent, within and across nodes.
    """

    num_sms: int = 20

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm: object = None,
        *,
        num_ranks_per_node: int | None = None,
    ) -> None:
        """Collective over ``group``: every rank must construct its Buffer.

        group: the expert-parallel group (the world or a ``dist.new_group``).
        num_nvl_bytes: the most bytes one normal-mode call may receive within a node.
        num_rdma_bytes: the most bytes one call may receive from other nodes
            (hierarchical mode) or in low-latency mode.
        low_latency_mode: enables :meth:`low_latency_dispatch` / :meth:`low_latency_combine`.
        num_qps_per_rank: upstream's RDMA queue pairs; accepted, no effect here.
        allow_nvlink_for_low_latency_mode, allow_mnnvl: how upstream's
            buffers reach peers (NVLink for low-latency traffic, memory shared
            over multi-node NVLink); accepted, no effect here: every transfer
            goes through the process group.
        explicitly_destroy: resources are released by :meth:`destroy` (which
            then is allowed) rather than by the garbage collector.
        enable_shrink: upstream's masking of failed ranks out of low-latency
            calls; refused (True raises ValueError): a collective needs every
            rank of its group.
        comm: an mpi4py communicator in place of ``group``; refused.
        num_ranks_per_node: ranks of the group per node (default: from
            ``LOCAL_WORLD_SIZE``, else 8 in a group of more than 8 ranks that 8
            divides, as upstream's NVLink domains, else the whole group).
        """
        if comm is not None:
            raise ValueError("comm (an mpi4py communicator) is not supported; pass a torch.distributed ProcessGroup as group")
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed.ProcessGroup; got {type(group).__name__}")
        self.group, self.rank, self.group_size = group, group.rank(), group.size()
        self._device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")

        def checks():
            self.num_nvl_bytes = check_bytes("num_nvl_bytes", num_nvl_bytes)
            self.num_rdma_bytes = check_bytes("num_rdma_bytes", num_rdma_bytes)
            self.num_qps_per_rank = check_positive("num_qps_per_rank", num_qps_per_rank)
            self.low_latency_mode = check_flag("low_latency_mode", low_latency_mode)
            check_flag("allow_nvlink_for_low_latency_mode", allow_nvlink_for_low_latency_mode)
            check_flag("allow_mnnvl", allow_mnnvl)
            self.explicitly_destroy = check_flag("explicitly_destroy", explicitly_destroy)
            self.enable_shrink = check_flag("enable_shrink", enable_shrink)
            if enable_shrink:
                raise ValueError(
                    "enable_shrink=True (masking failed ranks out of low-latency calls) is not supported: "
                    "a torch.distributed collective needs every rank of its group"
                )
            self.comm = Comm(group, group_topology(group, num_ranks_per_node))
            sizes = (
                self.num_nvl_bytes, self.num_rdma_bytes, threads.host_id(), torch.get_num_threads(),
                int(self.low_latency_mode), self.comm.topology.num_ranks_per_node,
            )
            return dict(zip(_BUFFER_SIZES, sizes))

        try:
            sizes = checks()
            problem = None
        except (TypeError, ValueError) as error:
            sizes, problem = dict.fromkeys(_BUFFER_SIZES, 0), error
        table = exchange_verdicts("Buffer", group, self._device, problem, sizes)
        check_agreement("Buffer", [{k: row[k] for k in ("low_latency_mode", "num_ranks_per_node")} for row in table])
        self._nvl_limits = [row["num_nvl_bytes"] for row in table]
        self._rdma_limits = [row["num_rdma_bytes"] for row in table]
        self._fair_threads = threads.fair_share(
            sizes["host"], [row["host"] for row in table], [row["threads"] for row in table], threads.num_cores()
        )
        self.num_nodes = self.comm.topology.num_nodes
        self.num_ranks_per_node = self.comm.topology.num_ranks_per_node
        self._combine_buffer: torch.Tensor | None = None
        self._destroyed = False

    @property
    def traffic(self) -> Traffic:
        return self.comm.traffic

    def destroy(self) -> None:
        """Release the buffer (a Buffer created with ``explicitly_destroy=True``
        only, as upstream); any later call raises RuntimeError."""
        if not self.explicitly_destroy:
            raise RuntimeError("destroy() needs a Buffer created with explicitly_destroy=True")
        self._check_alive()
        self._combine_buffer = None
        self._destroyed = True

    # --- upstream's static helpers -------------------------------------------------

    @staticmethod
    def is_sm90_compiled() -> bool:
        """Whether the features upstream builds only for SM90 (FP8 dispatch) are
        available: always, here."""
        return True

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the SM count of the normal kernels (even, as upstream requires)."""
        check_positive("new_num_sms", new_num_sms)
        check_divisible("new_num_sms", new_num_sms, 2, "2")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An event at the current point of the current stream (for ``previous_event``)."""
        return EventOverlap(capture())

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
        """The ``num_rdma_bytes`` low-latency calls of these sizes need (bf16 sizing)."""
        check_positive("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
        check_positive("hidden", hidden)
        check_positive("num_ranks", num_ranks)
        check_positive("num_experts", num_experts)
        check_divisible("num_experts", num_experts, num_ranks, "num_ranks")
        return low_latency.size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """A dispatch config (upstream's defaults; the chunk sizes do not matter here)."""
        check_positive("num_ranks", num_ranks)
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """A combine config (upstream's defaults; the chunk sizes do not matter here)."""
        check_positive("num_ranks", num_ranks)
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    # --- normal mode -------------------------------------------------------------

    @_sharing_cores
    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, EventOverlap]:
        """Where this rank's tokens go (no communication).

        topk_idx: [num_tokens, num_topk] int64, the experts of each token, -1 for none.

        Returns num_tokens_per_rank [num_ranks] int32, num_tokens_per_rdma_rank
        [num_nodes] int32 (None within one node), num_tokens_per_expert
        [num_experts] int32, is_token_in_rank [num_tokens, num_ranks] bool, and
        an event (already complete: the layout is computed on the spot).
        """
        self._check_alive()
        check_tensor("topk_idx", topk_idx, dtype=torch.int64, ndim=2)
        self._check_num_experts(num_experts)
        check_range("topk_idx", topk_idx, 0, num_experts, ignore=-1)
        _wait(previous_event)
        impl = backend.load(__package__, backend.choose("get_dispatch_layout", topk_idx.device))
        layout = impl.get_dispatch_layout(topk_idx, num_experts, self.group_size, self.num_nodes)
        return (*layout, EventOverlap(EventHandle()))

    @_sharing_cores
    def dispatch(
        self,
        x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        handle: DispatchHandle | None = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Send each token once to every rank holding at least one of its experts.

        x: [num_tokens, hidden] bfloat16 (or float16/float32), or an FP8 pair
            (float8_e4m3fn [num_tokens, hidden], float32 scales [num_tokens, hidden / 128]).
        handle: a previous dispatch's handle: reuse its layout (cached
            dispatch; then no layout arguments and no top-k).
        num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
            num_tokens_per_expert: from :meth:`get_dispatch_layout`
            (num_tokens_per_rdma_rank is optional). Checked against each
            other and against topk_idx (on the CPU always, on a GPU with
            ``DSINFRA_CHECKS=1``).
        topk_idx: [num_tokens, num_topk] int64; topk_weights: [num_tokens, num_topk] float32 (both or neither).
        expert_alignment: round each count of num_recv_tokens_per_expert_list up to a multiple of it.
        num_worst_tokens: when > 0, the received tensors have exactly this
            many rows (the rows received first, then zero rows with top-k ids
            -1), and num_recv_tokens_per_expert_list is empty, as upstream.
            A rank that would receive more raises ValueError on every rank.
        config, allocate_on_comm_stream: accepted for upstream compatibility.
        previous_event: completed before anything starts.
        async_finish: return once the transfer is under way; the event completes it.

        Returns (recv_x, recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert_list, handle, event). recv_x has x's form,
        its rows ordered by source rank, then source token; recv_topk_idx
        holds local expert ids, -1 (weight 0) for experts held elsewhere;
        the handle is upstream's tuple (:mod:`~dsinfra.deep_ep.handles`):
        within a node ``handle[0]`` is the rank prefix matrix [num_ranks,
        num_ranks] int32 (entry [i][j]: tokens sent to rank j by ranks 0..i),
        across nodes ``handle[-4]`` the prefix sums over source ranks of the
        rows received. A cached dispatch returns (recv_x, None, None, None, None, event).
        """
        self._check_alive()
        _wait(previous_event)
        if handle is not None:
            return self._cached_dispatch(x, handle, topk_idx, topk_weights, num_worst_tokens, config, async_finish)

        try:
            request = self._dispatch_request(
                x, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert,
                topk_idx, topk_weights, expert_alignment, num_worst_tokens, config,
            )
            problem = None
        except (TypeError, ValueError) as error:
            request, problem = None, error
        counts = exchange_counts(
            self.group,
            self._device,
            request.signature if request else dict.fromkeys(_DISPATCH_SIGNATURE, 0),
            problem,
            request.tokens_to_rank if request else None,
            request.tokens_to_node if request else None,
            [num_worst_tokens if request else 0],
            self.num_nodes if self.num_nodes > 1 else 0,
        )
        raise_problems("dispatch", problem, counts.has_problem)
        check_agreement("dispatch", counts.signature, describe)
        for rank in range(self.group_size):
            worst, received = counts.extra[rank][0], sum(row[rank] for row in counts.tokens_to_rank)
            if worst and received > worst:
                raise ValueError(f"dispatch: rank {rank} would receive {received} tokens, more than its num_worst_tokens ({worst})")
        tokens_to_expert = exchange_expert_counts(self.group, request.num_tokens_per_expert.to(self._device))

        topology = self.comm.topology
        if self.num_nodes > 1:
            layout = hierarchical.make_layout(topology, request.is_token_in_rank, counts.tokens_to_rank, counts.tokens_to_node, num_worst_tokens)
        else:
            layout = normal.make_layout(topology, request.is_token_in_rank, counts.tokens_to_rank, num_worst_tokens)
        fields = list(request.fields)
        if topk_idx is not None:
            fields += [topk_idx, topk_weights]
        outputs, works, finish, layout = self._dispatch_rows(fields, layout)

        num_local = request.num_experts // self.group_size
        per_expert = [sum(row[self.rank * num_local + e] for row in tokens_to_expert) for e in range(num_local)]
        per_expert = [-(-count // expert_alignment) * expert_alignment for count in per_expert] if not num_worst_tokens else []
        recv_topk_idx = recv_topk_weights = None
        num_recv = layout.num_recv(self.rank)
        if topk_idx is not None:
            recv_topk_idx, recv_topk_weights = outputs[-2:]
            outputs = outputs[:-2]
            unpack = finish

            def finish() -> None:
                unpack()
                normal.localize_topk(recv_topk_idx[:num_recv], recv_topk_weights[:num_recv], self.rank, num_local)

            recv_topk_idx[num_recv:] = -1
            recv_topk_weights[num_recv:] = 0.0
        for out in outputs:
            out[num_recv:] = 0
        event = self._event(works, finish, async_finish)
        handle = public_handle(layout, self.rank, self.num_ranks_per_node)
        return _as_x(outputs, request.is_fp8), recv_topk_idx, recv_topk_weights, per_expert, handle, event

    @_sharing_cores
    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None = None,
        bias: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]:
        """Send each received row back to its source, which sums (without
        weights) what every rank returns for each of its tokens.

        x: [num_recv_tokens, hidden] bfloat16 (or float16/float32), in the order
            dispatch delivered them (with ``num_worst_tokens``: that many rows,
            those past the received ones never read).
        handle: the handle of that dispatch.
        topk_weights: [num_recv_tokens, num_topk] float32, summed the same way.
        bias: one or two [num_tokens, hidden] tensors added to the sums (in
            float32, before the cast to x's dtype), as upstream.
        config, allocate_on_comm_stream: accepted for upstream compatibility.

        Returns (combined_x [num_tokens, hidden] in x's dtype, in the original
        token order, zeros (plus bias) for tokens sent nowhere; combined_topk_weights
        [num_tokens, num_topk] float32 or None; event).
        """
        self._check_alive()
        _wait(previous_event)

        def checks():
            layout = _layout_of(handle)
            num_recv = layout.num_recv(self.rank)
            check_tensor("x", x, dtype=HIDDEN_DTYPES, shape=(layout.num_recv_rows(self.rank), None))
            fields = [x[:num_recv]]
            if topk_weights is not None:
                check_tensor("topk_weights", topk_weights, dtype=torch.float32, shape=(x.shape[0], None), device=x.device)
                fields.append(topk_weights[:num_recv])
            bias_terms = _bias_terms(bias, (layout.is_token_in_rank.shape[0], x.shape[1]), x.device)
            _check_config(config)
            sizes = {"hidden": x.shape[1], "x dtype": DTYPE_CODES[x.dtype], "topk_weights columns": fields[-1].shape[1] if topk_weights is not None else -1}
            return (layout, fields, bias_terms), sizes

        layout, fields, bias_terms = run_checks("combine", self.group, self._device, checks, ("hidden", "x dtype", "topk_weights columns"))
        fmt = RowFormat(fields)
        path = hierarchical if layout.tokens_to_node is not None else normal
        self._check_capacity("combine", *path.receive_bytes(self.comm.topology, layout, fmt.row_bytes, combine=True))
        outputs, works, finish = path.combine_rows(self.comm, fmt, fields, layout, bias_terms)
        combined_weights = outputs[1] if topk_weights is not None else None
        return outputs[0], combined_weights, self._event(works, finish, async_finish)

    # --- low-latency mode --------------------------------------------------------

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Upstream zeroes its low-latency signalling buffers here. This
        implementation keeps no state between calls, so there is nothing to
        clean; it checks that the buffer fits calls of these sizes."""
        self._check_alive()
        self._check_low_latency("clean_low_latency_buffer", num_max_dispatch_tokens_per_rank, hidden, num_experts)

    @_sharing_cores
    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None,
        dispatch_wait_recv_cost_stats: torch.Tensor | None = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ):
        """Send every (token, expert) pair to the expert, in static shapes.

        x: [num_tokens, hidden] bfloat16, num_tokens <= num_max_dispatch_tokens_per_rank.
        topk_idx: [num_tokens, num_topk] int64, -1 for none.
        num_max_dispatch_tokens_per_rank, num_experts: the same on every rank.
        cumulative_local_expert_recv_stats: int32 [num_local_experts]; each
            expert's received count is added to it.
        dispatch_wait_recv_cost_stats: upstream's per-peer wait timers;
            refused (the transfer is one collective, with no per-peer wait).
        use_fp8: cast to FP8 on the way; else bf16.
        round_scale: FP8 scales rounded up to powers of two.
        use_ue8m0: with round_scale, deliver the scales as UE8M0 exponent
            bytes, four packed in each int32 (hidden a multiple of 512).
        async_finish: return an event that completes the transfer.
        return_recv_hook: only start the transfer; the returned hook completes it.

        Returns (recv_x, recv_count, handle, event, hook). recv_x is
        (float8_e4m3fn [num_local_experts, num_max_dispatch_tokens_per_rank * num_ranks, hidden],
        scales [num_local_experts, num_max_dispatch_tokens_per_rank * num_ranks, hidden / 128]
        float32 (or hidden / 512 int32 with use_ue8m0), column-major in the
        last two dimensions), or the bf16 tensor without FP8; expert e's rows
        up to recv_count[e] (int32 [num_local_experts]) are valid, ordered by
        source rank, then source token. hook is None without return_recv_hook.
        """
        self._check_alive()

        def checks():
            check_tensor("x", x, dtype=torch.bfloat16, ndim=2)
            num_tokens, hidden = x.shape
            check_tensor("topk_idx", topk_idx, dtype=torch.int64, shape=(num_tokens, None), device=x.device)
            self._check_low_latency("low_latency_dispatch", num_max_dispatch_tokens_per_rank, hidden, num_experts)
            if num_tokens > num_max_dispatch_tokens_per_rank:
                raise ValueError(
                    f"x has {num_tokens} tokens, more than num_max_dispatch_tokens_per_rank ({num_max_dispatch_tokens_per_rank})"
                )
            for name, flag in (("use_fp8", use_fp8), ("round_scale", round_scale), ("use_ue8m0", use_ue8m0)):
                check_flag(name, flag)
            if round_scale and not use_fp8:
                raise ValueError("round_scale=True needs use_fp8=True")
            if use_ue8m0 and not round_scale:
                raise ValueError("use_ue8m0=True needs round_scale=True (UE8M0 holds powers of two only)")
            if use_fp8:
                check_divisible("x.shape[1] (hidden)", hidden, 4 * GROUP if use_ue8m0 else GROUP, "512 for UE8M0 scales" if use_ue8m0 else "128 for FP8 dispatch")
            if cumulative_local_expert_recv_stats is not None:
                check_tensor(
                    "cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats, dtype=torch.int32,
                    shape=(num_experts // self.group_size,), device=x.device,
                )
            _refuse_wait_stats("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats)
            if backend.range_checks_enabled(x.device):
                check_range("topk_idx", topk_idx, 0, num_experts, ignore=-1)
            sizes = {
                "hidden": hidden,
                "num_max_dispatch_tokens_per_rank": num_max_dispatch_tokens_per_rank,
                "num_experts": num_experts,
                "use_fp8": int(use_fp8),
            }
            return None, sizes

        run_checks("low_latency_dispatch", self.group, self._device, checks, ("hidden", "num_max_dispatch_tokens_per_rank", "num_experts", "use_fp8"))
        recv_x, recv_count, handle, works, finish = low_latency.dispatch(
            self.comm, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale, use_ue8m0,
            cumulative_local_expert_recv_stats,
        )
        event, hook = self._low_latency_event(works, finish, async_finish, return_recv_hook)
        handle.arrival = event.event
        return recv_x, recv_count, handle, event, hook

    @_sharing_cores
    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: torch.Tensor | None = None,
        combine_wait_recv_cost_stats: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, EventOverlap, Callable[[], None] | None]:
        """Send the experts' outputs back and reduce them with the weights.

        x: [num_local_experts, num_max_dispatch_tokens_per_rank * num_ranks, hidden]
            bfloat16, the outputs of the rows low_latency_dispatch delivered
            (rows past recv_count are never read).
        topk_idx, topk_weights: [num_tokens, num_topk] int64 / float32, this
            rank's routing as dispatched.
        handle: that dispatch's handle (a dispatch not yet waited for is
            completed first).
        use_logfmt: upstream's 10-bit wire format; accepted, the outputs
            travel in bf16 (no loss from compression).
        zero_copy: send what was written into
            :meth:`get_next_low_latency_combine_buffer` instead of x.
        out: [num_tokens, hidden] bfloat16 to write the result into (and return).
        combine_wait_recv_cost_stats: refused, as in :meth:`low_latency_dispatch`.

        Returns (combined_x [num_tokens, hidden] bfloat16, event, hook):
        combined_x[t] = sum_k topk_weights[t, k] * (expert topk_idx[t, k]'s output for token t).
        """
        self._check_alive()

        def checks():
            _check_low_latency_handle(handle)
            max_tokens, hidden, num_experts = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
            expert_outputs = self._zero_copy_buffer(handle) if check_flag("zero_copy", zero_copy) else x
            check_tensor("x", x, dtype=torch.bfloat16, shape=(num_experts // self.group_size, max_tokens * self.group_size, hidden))
            check_tensor("topk_idx", topk_idx, dtype=torch.int64, ndim=2, device=x.device)
            check_tensor("topk_weights", topk_weights, dtype=torch.float32, shape=tuple(topk_idx.shape), device=x.device)
            num_tokens = topk_idx.shape[0]
            if num_tokens > max_tokens:
                raise ValueError(f"topk_idx has {num_tokens} tokens, more than the dispatch's num_max_dispatch_tokens_per_rank ({max_tokens})")
            if out is not None:
                check_tensor("out", out, dtype=torch.bfloat16, shape=(num_tokens, hidden), device=x.device)
            check_flag("use_logfmt", use_logfmt)
            _refuse_wait_stats("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats)
            self._check_low_latency("low_latency_combine", max_tokens, hidden, num_experts)
            if backend.range_checks_enabled(x.device):
                check_range("topk_idx", topk_idx, 0, num_experts, ignore=-1)
            return expert_outputs, {"hidden": hidden, "num_max_dispatch_tokens_per_rank": max_tokens, "num_experts": num_experts}

        expert_outputs = run_checks(
            "low_latency_combine", self.group, self._device, checks, ("hidden", "num_max_dispatch_tokens_per_rank", "num_experts")
        )
        (combined,), works, finish = low_latency.combine(self.comm, expert_outputs, topk_idx, topk_weights, handle)
        if out is not None:
            unpack = finish

            def finish() -> None:
                unpack()
                out.copy_(combined)

        event, hook = self._low_latency_event(works, finish, async_finish, return_recv_hook)
        return (combined if out is None else out), event, hook

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The bf16 tensor [num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank, hidden]
        that the next ``low_latency_combine(..., zero_copy=True)`` sends: write
        the experts' outputs into it instead of passing them as x. One tensor
        per Buffer, kept until the shapes change."""
        self._check_alive()
        _check_low_latency_handle(handle)
        shape = (handle.num_experts // self.group_size, self.group_size * handle.num_max_dispatch_tokens_per_rank, handle.hidden)
        if self._combine_buffer is None or tuple(self._combine_buffer.shape) != shape:
            self._combine_buffer = torch.zeros(shape, dtype=torch.bfloat16, device=handle.src_info.device)
        return self._combine_buffer

    # --- internals ---------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("this Buffer was destroyed (Buffer.destroy()); create a new one")

    def _zero_copy_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        shape = (handle.num_experts // self.group_size, self.group_size * handle.num_max_dispatch_tokens_per_rank, handle.hidden)
        if self._combine_buffer is None or tuple(self._combine_buffer.shape) != shape:
            raise ValueError("zero_copy=True sends the tensor of get_next_low_latency_combine_buffer(handle): fill that first")
        return self._combine_buffer

    def _dispatch_request(
        self, x, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert,
        topk_idx, topk_weights, expert_alignment, num_worst_tokens, config,
    ) -> _DispatchRequest:
        """A dispatch's arguments, checked (cheap checks always; the checks
        that read tensors where checks may synchronise)."""
        fields, is_fp8 = check_token_fields(x)
        num_tokens, hidden = fields[0].shape
        device = fields[0].device
        check_positive("expert_alignment", expert_alignment)
        check_positive("num_worst_tokens", num_worst_tokens, allow_zero=True)
        _check_config(config)
        missing = [
            name
            for name, value in (
                ("num_tokens_per_rank", num_tokens_per_rank),
                ("is_token_in_rank", is_token_in_rank),
                ("num_tokens_per_expert", num_tokens_per_expert),
            )
            if value is None
        ]
        if missing:
            raise ValueError(f"dispatch without a handle needs {', '.join(missing)} (from get_dispatch_layout)")
        num_ranks = self.group_size
        check_tensor("num_tokens_per_rank", num_tokens_per_rank, dtype=torch.int32, shape=(num_ranks,), device=device)
        check_tensor("is_token_in_rank", is_token_in_rank, dtype=torch.bool, shape=(num_tokens, num_ranks), device=device)
        check_tensor("num_tokens_per_expert", num_tokens_per_expert, dtype=torch.int32, ndim=1, device=device)
        num_experts = num_tokens_per_expert.shape[0]
        self._check_num_experts(num_experts, "num_tokens_per_expert.shape[0]")
        if num_tokens_per_rdma_rank is not None:
            check_tensor("num_tokens_per_rdma_rank", num_tokens_per_rdma_rank, dtype=torch.int32, shape=(self.num_nodes,), device=device)
        if (topk_idx is None) != (topk_weights is None):
            raise ValueError("topk_idx and topk_weights go together: pass both or neither")
        num_topk = -1
        if topk_idx is not None:
            check_tensor("topk_idx", topk_idx, dtype=torch.int64, shape=(num_tokens, None), device=device)
            check_tensor("topk_weights", topk_weights, dtype=torch.float32, shape=(num_tokens, topk_idx.shape[1]), device=device)
            num_topk = topk_idx.shape[1]
        is_token_in_rank = is_token_in_rank.contiguous()
        if backend.range_checks_enabled(device):
            check_layout_against_topk(
                topk_idx, num_experts, num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, self.num_nodes
            )
        tokens_to_rank = is_token_in_rank.sum(dim=0)
        in_node = is_token_in_rank.view(num_tokens, self.num_nodes, self.num_ranks_per_node).any(dim=2)
        return _DispatchRequest(
            fields=fields,
            is_fp8=is_fp8,
            signature={"hidden": hidden, "x dtype": DTYPE_CODES[fields[0].dtype], "num_topk": num_topk, "num_experts": num_experts},
            is_token_in_rank=is_token_in_rank,
            tokens_to_rank=tokens_to_rank,
            tokens_to_node=in_node.sum(dim=0) if self.num_nodes > 1 else tokens_to_rank[:0],
            num_tokens_per_expert=num_tokens_per_expert,
            num_experts=num_experts,
        )

    def _cached_dispatch(self, x, handle, topk_idx, topk_weights, num_worst_tokens, config, async_finish):
        """Dispatch ``x`` by ``handle``'s layout (no count exchange)."""

        def checks():
            layout = _layout_of(handle)
            fields, is_fp8 = check_token_fields(x)
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("a cached dispatch (with a handle) takes no topk_idx or topk_weights")
            if num_worst_tokens not in (0, layout.num_worst_tokens):
                raise ValueError(
                    f"num_worst_tokens ({num_worst_tokens}) differs from that of the dispatch that made the handle ({layout.num_worst_tokens})"
                )
            _check_config(config)
            num_tokens = layout.is_token_in_rank.shape[0]
            if fields[0].shape[0] != num_tokens:
                raise ValueError(f"x has {fields[0].shape[0]} tokens but the handle was made for {num_tokens}")
            return (layout, fields, is_fp8), {"hidden": fields[0].shape[1], "x dtype": DTYPE_CODES[fields[0].dtype]}

        layout, fields, is_fp8 = run_checks("dispatch", self.group, self._device, checks, ("hidden", "x dtype"))
        outputs, works, finish, _ = self._dispatch_rows(fields, layout)
        for out in outputs:
            out[layout.num_recv(self.rank) :] = 0
        return _as_x(outputs, is_fp8), None, None, None, None, self._event(works, finish, async_finish)

    def _check_num_experts(self, num_experts: int, name: str = "num_experts") -> None:
        check_positive(name, num_experts)
        check_divisible(name, num_experts, self.group_size, "the number of ranks")

    def _dispatch_rows(self, fields: list[torch.Tensor], layout: Layout):
        """Check the buffers against ``layout`` and start the transfer."""
        fmt = RowFormat(fields)
        topology = self.comm.topology
        if layout.tokens_to_node is None:
            self._check_capacity("dispatch", *normal.receive_bytes(topology, layout, fmt.row_bytes, combine=False))
            outputs, works, finish = normal.dispatch_rows(self.comm, fmt, fields, layout)
        else:
            self._check_capacity("dispatch", *hierarchical.receive_bytes(topology, layout, fmt.row_bytes, combine=False))
            (outputs, works, finish), layout = hierarchical.dispatch_rows(self.comm, fmt, fields, layout)
        return outputs, works, finish, layout

    def _check_capacity(self, operation: str, intranode: list[int], internode: list[int]) -> None:
        check_capacity(operation, intranode, self._nvl_limits, "num_nvl_bytes", "within its node")
        if any(internode):
            check_capacity(operation, internode, self._rdma_limits, "num_rdma_bytes", "from other nodes")

    def _check_low_latency(self, operation: str, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        if not self.low_latency_mode:
            raise ValueError(f"{operation} needs a Buffer created with low_latency_mode=True")
        check_positive("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
        self._check_num_experts(num_experts)
        needed = low_latency.size_hint(num_max_dispatch_tokens_per_rank, hidden, self.group_size, num_experts)
        check_capacity(operation, [needed] * self.group_size, self._rdma_limits, "num_rdma_bytes", "in low-latency mode")

    def _event(self, works: list, finish: Callable[[], None], async_finish: bool) -> EventOverlap:
        event = EventHandle(works, self._sharing_cores_in(finish))
        if not async_finish:
            event.current_stream_wait()
        return EventOverlap(event)

    def _low_latency_event(self, works, finish, async_finish: bool, return_recv_hook: bool):
        event = EventHandle(works, self._sharing_cores_in(finish))
        if not (async_finish or return_recv_hook):
            event.current_stream_wait()
        return EventOverlap(event), event.current_stream_wait if return_recv_hook else None

    def _sharing_cores_in(self, finish: Callable[[], None]) -> Callable[[], None]:
        """``finish`` run with the rank's fair share of cores, whoever waits for it."""

        def run() -> None:
            with threads.at_most(self._fair_threads):
                finish()

        return run


@dataclasses.dataclass(frozen=True)
class _DispatchRequest:
    """A normal-mode dispatch's checked arguments and this rank's counts."""

    fields: list[torch.Tensor]
    is_fp8: bool
    signature: dict[str, int]
    is_token_in_rank: torch.Tensor
    tokens_to_rank: torch.Tensor
    tokens_to_node: torch.Tensor
    num_tokens_per_expert: torch.Tensor
    num_experts: int


def _wait(previous_event: EventOverlap | None) -> None:
    if previous_event is None:
        return
    if not isinstance(previous_event, EventOverlap):
        raise TypeError(f"previous_event must be an EventOverlap; got {type(previous_event).__name__}")
    previous_event.current_stream_wait()


def _check_config(config: Config | None) -> None:
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be a dsinfra.deep_ep.Config; got {type(config).__name__}")


def _layout_of(handle) -> Layout:
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"handle must be a handle returned by Buffer.dispatch; got {type(handle).__name__}")
    return handle.layout


def _check_low_latency_handle(handle) -> None:
    if not isinstance(handle, LowLatencyHandle):
        raise TypeError(f"handle must be a handle returned by low_latency_dispatch; got {type(handle).__name__}")


def _bias_terms(bias, shape: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, ...]:
    """combine's ``bias`` (None, a tensor or a pair) as a tuple of checked tensors."""
    if bias is None:
        return ()
    terms = tuple(bias) if isinstance(bias, (tuple, list)) else (bias,)
    if len(terms) > 2:
        raise ValueError(f"bias must be a tensor or a pair of tensors; got {len(terms)}")
    for i, term in enumerate(terms):
        check_tensor(f"bias[{i}]" if len(terms) > 1 else "bias", term, dtype=HIDDEN_DTYPES, shape=shape, device=device)
    return terms


def _refuse_wait_stats(name: str, value: torch.Tensor | None) -> None:
    if value is not None:
        raise ValueError(
            f"{name} is not supported: each transfer here is one collective, with no per-peer wait to time; pass None"
        )


def _as_x(outputs: list[torch.Tensor], is_fp8: bool):
    """The received fields in x's form: the tensor, or the FP8 pair."""
    return (outputs[0], outputs[1]) if is_fp8 else outputs[0]
