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

from collections.abc import Callable

import torch
import torch.distributed as dist

from dsinfra import backend
from dsinfra.deep_ep import hierarchical, low_latency, normal
from dsinfra.deep_ep.comm import Comm, Traffic, group_topology
from dsinfra.deep_ep.config import Config
from dsinfra.deep_ep.event import EventHandle, EventOverlap, capture
from dsinfra.deep_ep.low_latency import LowLatencyHandle
from dsinfra.deep_ep.normal import DispatchHandle
from dsinfra.deep_ep.plan import check_agreement, check_capacity, exchange_counts, raise_problems
from dsinfra.deep_ep.rows import RowFormat
from dsinfra.fp8 import GROUP
from dsinfra.validation import check_divisible, check_positive, check_range, check_tensor

HIDDEN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_DTYPE_CODES = {dtype: code for code, dtype in enumerate((*HIDDEN_DTYPES, torch.float8_e4m3fn))}
_DTYPE_NAMES = {code: str(dtype).replace("torch.", "") for dtype, code in _DTYPE_CODES.items()}


class Buffer:
    """The expert-parallel communication buffer of one rank of ``group``.

    Attributes:
        num_sms: upstream's SM budget of the normal kernels (class-wide); it
            feeds the :class:`Config` defaults and changes nothing else here.
        rank, group_size, group: this rank, the group's size, the group.
        num_nvl_bytes, num_rdma_bytes: the limits on what one call may
            receive within a node, and from other nodes or in low-latency mode.
        low_latency_mode: whether the low-latency calls are enabled.
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
        num_qps_per_rank: int = 1,
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
        num_ranks_per_node: ranks of the group per node (default: from
            ``LOCAL_WORLD_SIZE``, else the whole group is one node).
        """
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed.ProcessGroup; got {type(group).__name__}")
        self.num_nvl_bytes = check_positive("num_nvl_bytes", num_nvl_bytes, allow_zero=True)
        self.num_rdma_bytes = check_positive("num_rdma_bytes", num_rdma_bytes, allow_zero=True)
        self.num_qps_per_rank = check_positive("num_qps_per_rank", num_qps_per_rank)
        if not isinstance(low_latency_mode, bool):
            raise TypeError(f"low_latency_mode must be a bool; got {type(low_latency_mode).__name__}")
        self.low_latency_mode = low_latency_mode
        self.group, self.rank, self.group_size = group, group.rank(), group.size()
        self.comm = Comm(group, group_topology(group, num_ranks_per_node))
        self.num_nodes = self.comm.topology.num_nodes
        self.num_ranks_per_node = self.comm.topology.num_ranks_per_node

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
        mine = torch.tensor([num_nvl_bytes, num_rdma_bytes, low_latency_mode, self.num_ranks_per_node], device=device)
        everyone = [torch.empty_like(mine) for _ in range(self.group_size)]
        dist.all_gather(everyone, mine, group=group)
        table = torch.stack(everyone).tolist()
        check_agreement("Buffer", [{"low_latency_mode": row[2], "num_ranks_per_node": row[3]} for row in table])
        self._nvl_limits = [row[0] for row in table]
        self._rdma_limits = [row[1] for row in table]

    @property
    def traffic(self) -> Traffic:
        return self.comm.traffic

    # --- upstream's static helpers -------------------------------------------------

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
        check_tensor("topk_idx", topk_idx, dtype=torch.int64, ndim=2)
        self._check_num_experts(num_experts)
        check_range("topk_idx", topk_idx, 0, num_experts, ignore=-1)
        _wait(previous_event)
        impl = backend.load(__package__, backend.choose("get_dispatch_layout", topk_idx.device))
        layout = impl.get_dispatch_layout(topk_idx, num_experts, self.group_size, self.num_nodes)
        return (*layout, EventOverlap(EventHandle()))

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
            (num_tokens_per_rdma_rank is optional).
        topk_idx: [num_tokens, num_topk] int64; topk_weights: [num_tokens, num_topk] float32 (both or neither).
        expert_alignment: round each count of num_recv_tokens_per_expert_list up to a multiple of it.
        config, allocate_on_comm_stream: accepted for upstream compatibility.
        previous_event: completed before anything starts.
        async_finish: return once the transfer is under way; the event completes it.

        Returns (recv_x, recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert_list, handle, event). recv_x has x's form,
        its rows ordered by source rank, then source token; recv_topk_idx
        holds local expert ids, -1 (weight 0) for experts held elsewhere;
        ``handle[0]`` is the rank prefix matrix [num_ranks, num_ranks] int32
        (entry [i][j]: tokens sent to rank j by ranks 0..i). A cached
        dispatch returns (recv_x, None, None, None, None, event).
        """
        fields, is_fp8 = self._token_fields(x)
        num_tokens, hidden = fields[0].shape
        device = fields[0].device
        check_positive("expert_alignment", expert_alignment)
        _check_config(config)
        _wait(previous_event)

        if handle is not None:
            if not isinstance(handle, DispatchHandle):
                raise TypeError(f"handle must be a handle returned by Buffer.dispatch; got {type(handle).__name__}")
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("a cached dispatch (with a handle) takes no topk_idx or topk_weights")
            _check_handle_tokens(handle, num_tokens, "x")
            outputs, works, finish, _ = self._dispatch_rows(fields, handle)
            return _as_x(outputs, is_fp8), None, None, None, None, self._event(works, finish, async_finish)

        num_experts, num_topk = self._check_layout_arguments(
            num_tokens, device, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights
        )
        is_token_in_rank = is_token_in_rank.contiguous()
        tokens_to_rank = is_token_in_rank.sum(dim=0)
        in_node = is_token_in_rank.view(num_tokens, self.num_nodes, self.num_ranks_per_node).any(dim=2)
        tokens_to_node = in_node.sum(dim=0) if self.num_nodes > 1 else tokens_to_rank[:0]
        problem = None
        if backend.range_checks_enabled(device):
            problem = _layout_problem(topk_idx, num_experts, num_tokens_per_rank, tokens_to_rank, num_tokens_per_rdma_rank, tokens_to_node)
        signature = {"hidden": hidden, "x dtype": _DTYPE_CODES[fields[0].dtype], "num_topk": num_topk, "num_experts": num_experts}
        counts = exchange_counts(self.group, signature, problem, tokens_to_rank, tokens_to_node, num_tokens_per_expert)
        raise_problems("dispatch", problem, counts.has_problem)
        check_agreement("dispatch", counts.signature, lambda name, v: _DTYPE_NAMES[v] if name == "x dtype" else v)

        topology = self.comm.topology
        if self.num_nodes > 1:
            handle = hierarchical.make_handle(topology, is_token_in_rank, counts.tokens_to_rank, counts.tokens_to_node)
        else:
            handle = normal.make_handle(topology, is_token_in_rank, counts.tokens_to_rank)
        if topk_idx is not None:
            fields += [topk_idx, topk_weights]
        outputs, works, finish, handle = self._dispatch_rows(fields, handle)

        num_local = num_experts // self.group_size
        per_expert = [sum(row[self.rank * num_local + e] for row in counts.tokens_to_expert) for e in range(num_local)]
        per_expert = [-(-count // expert_alignment) * expert_alignment for count in per_expert]
        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None:
            recv_topk_idx, recv_topk_weights = outputs[-2:]
            outputs = outputs[:-2]
            unpack = finish

            def finish() -> None:
                unpack()
                normal.localize_topk(recv_topk_idx, recv_topk_weights, self.rank, num_local)

        event = self._event(works, finish, async_finish)
        return _as_x(outputs, is_fp8), recv_topk_idx, recv_topk_weights, per_expert, handle, event

    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None = None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]:
        """Send each received row back to its source, which sums (without
        weights) what every rank returns for each of its tokens.

        x: [num_recv_tokens, hidden] bfloat16 (or float16/float32), rows in
            the order dispatch delivered them.
        handle: the handle of that dispatch.
        topk_weights: [num_recv_tokens, num_topk] float32, summed the same way.
        config, allocate_on_comm_stream: accepted for upstream compatibility.

        Returns (combined_x [num_tokens, hidden] in x's dtype, in the original
        token order, zeros for tokens sent nowhere; combined_topk_weights
        [num_tokens, num_topk] float32 or None; event).
        """
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle must be a handle returned by Buffer.dispatch; got {type(handle).__name__}")
        num_recv = sum(row[self.rank] for row in handle.tokens_to_rank)
        check_tensor("x", x, dtype=HIDDEN_DTYPES, shape=(num_recv, None))
        fields = [x]
        if topk_weights is not None:
            check_tensor("topk_weights", topk_weights, dtype=torch.float32, shape=(num_recv, None), device=x.device)
            fields.append(topk_weights)
        _check_config(config)
        _wait(previous_event)
        fmt = RowFormat(fields)
        path = hierarchical if handle.tokens_to_node is not None else normal
        self._check_capacity("combine", *path.receive_bytes(self.comm.topology, handle, fmt.row_bytes, combine=True))
        outputs, works, finish = path.combine_rows(self.comm, fmt, fields, handle)
        combined_weights = outputs[1] if topk_weights is not None else None
        return outputs[0], combined_weights, self._event(works, finish, async_finish)

    # --- low-latency mode --------------------------------------------------------

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Upstream zeroes its low-latency signalling buffers here. This
        implementation keeps no state between calls, so there is nothing to
        clean; it checks that the buffer fits calls of these sizes."""
        self._check_low_latency("clean_low_latency_buffer", num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        *,
        use_fp8: bool = True,
    ):
        """Send every (token, expert) pair to the expert, in static shapes.

        x: [num_tokens, hidden] bfloat16, num_tokens <= num_max_dispatch_tokens_per_rank.
        topk_idx: [num_tokens, num_topk] int64, -1 for none.
        num_max_dispatch_tokens_per_rank, num_experts: the same on every rank.
        async_finish: return an event that completes the transfer.
        return_recv_hook: only start the transfer; the returned hook completes it.
        use_fp8: cast to FP8 on the way (upstream's later ``use_fp8``); else bf16.

        Returns (recv_x, recv_count, handle, event, hook). recv_x is
        (float8_e4m3fn [num_local_experts, num_max_dispatch_tokens_per_rank * num_ranks, hidden],
        float32 scales [num_local_experts, num_max_dispatch_tokens_per_rank * num_ranks, hidden / 128],
        column-major in the last two dimensions), or the bf16 tensor without FP8;
        expert e's rows up to recv_count[e] (int32 [num_local_experts]) are
        valid, ordered by source rank, then source token. hook is None
        without return_recv_hook.
        """
        check_tensor("x", x, dtype=torch.bfloat16, ndim=2)
        num_tokens, hidden = x.shape
        check_tensor("topk_idx", topk_idx, dtype=torch.int64, shape=(num_tokens, None), device=x.device)
        self._check_low_latency("low_latency_dispatch", num_max_dispatch_tokens_per_rank, hidden, num_experts)
        if num_tokens > num_max_dispatch_tokens_per_rank:
            raise ValueError(
                f"x has {num_tokens} tokens, more than num_max_dispatch_tokens_per_rank ({num_max_dispatch_tokens_per_rank})"
            )
        if use_fp8:
            check_divisible("x.shape[1] (hidden)", hidden, GROUP, "128 for FP8 dispatch")
        check_range("topk_idx", topk_idx, 0, num_experts, ignore=-1)
        self._check_low_latency_agreement(
            "low_latency_dispatch", x.device, hidden=hidden, num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank,
            num_experts=num_experts, use_fp8=int(use_fp8),
        )
        recv_x, recv_count, handle, works, finish = low_latency.dispatch(
            self.comm, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8
        )
        event, hook = self._low_latency_event(works, finish, async_finish, return_recv_hook)
        return recv_x, recv_count, handle._replace(arrival=event.event), event, hook

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> tuple[torch.Tensor, EventOverlap, Callable[[], None] | None]:
        """Send the experts' outputs back and reduce them with the weights.

        x: [num_local_experts, num_max_dispatch_tokens_per_rank * num_ranks, hidden]
            bfloat16, the outputs of the rows low_latency_dispatch delivered
            (rows past recv_count are never read).
        topk_idx, topk_weights: [num_tokens, num_topk] int64 / float32, this
            rank's routing as dispatched.
        handle: that dispatch's handle (a dispatch not yet waited for is
            completed first).

        Returns (combined_x [num_tokens, hidden] bfloat16, event, hook):
        combined_x[t] = sum_k topk_weights[t, k] * (expert topk_idx[t, k]'s output for token t).
        """
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(f"handle must be a handle returned by low_latency_dispatch; got {type(handle).__name__}")
        max_tokens, hidden, num_experts = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
        slots = max_tokens * self.group_size
        check_tensor("x", x, dtype=torch.bfloat16, shape=(num_experts // self.group_size, slots, hidden))
        check_tensor("topk_idx", topk_idx, dtype=torch.int64, ndim=2, device=x.device)
        check_tensor("topk_weights", topk_weights, dtype=torch.float32, shape=tuple(topk_idx.shape), device=x.device)
        if topk_idx.shape[0] > max_tokens:
            raise ValueError(f"topk_idx has {topk_idx.shape[0]} tokens, more than the dispatch's num_max_dispatch_tokens_per_rank ({max_tokens})")
        self._check_low_latency("low_latency_combine", max_tokens, hidden, num_experts)
        check_range("topk_idx", topk_idx, 0, num_experts, ignore=-1)
        outputs, works, finish = low_latency.combine(self.comm, x, topk_idx, topk_weights, handle)
        event, hook = self._low_latency_event(works, finish, async_finish, return_recv_hook)
        return outputs[0], event, hook

    # --- internals ---------------------------------------------------------------

    def _token_fields(self, x) -> tuple[list[torch.Tensor], bool]:
        """x (a tensor or an FP8 pair) -> its fields, and whether it is FP8."""
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise ValueError(f"x as a tuple must be (x_fp8, scales); got {len(x)} elements")
            x_fp8, scales = x
            check_tensor("x[0]", x_fp8, dtype=torch.float8_e4m3fn, ndim=2)
            num_tokens, hidden = x_fp8.shape
            check_divisible("x[0].shape[1] (hidden)", hidden, GROUP, "128 for FP8")
            check_tensor("x[1]", scales, dtype=torch.float32, shape=(num_tokens, hidden // GROUP), device=x_fp8.device)
            return [x_fp8, scales], True
        check_tensor("x", x, dtype=HIDDEN_DTYPES, ndim=2)
        return [x], False

    def _check_num_experts(self, num_experts: int, name: str = "num_experts") -> None:
        check_positive(name, num_experts)
        check_divisible(name, num_experts, self.group_size, "the number of ranks")

    def _check_layout_arguments(
        self, num_tokens, device, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights
    ) -> tuple[int, int]:
        """The cheap checks of a dispatch's layout and top-k arguments; returns
        (num_experts, num_topk), num_topk -1 without top-k."""
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
        if topk_idx is None:
            return num_experts, -1
        check_tensor("topk_idx", topk_idx, dtype=torch.int64, shape=(num_tokens, None), device=device)
        check_tensor("topk_weights", topk_weights, dtype=torch.float32, shape=(num_tokens, topk_idx.shape[1]), device=device)
        return num_experts, topk_idx.shape[1]

    def _dispatch_rows(self, fields: list[torch.Tensor], handle: DispatchHandle):
        """Check the buffers against ``handle``'s layout and start the transfer."""
        fmt = RowFormat(fields)
        topology = self.comm.topology
        if handle.tokens_to_node is None:
            self._check_capacity("dispatch", *normal.receive_bytes(topology, handle, fmt.row_bytes, combine=False))
            outputs, works, finish = normal.dispatch_rows(self.comm, fmt, fields, handle)
        else:
            self._check_capacity("dispatch", *hierarchical.receive_bytes(topology, handle, fmt.row_bytes, combine=False))
            (outputs, works, finish), handle = hierarchical.dispatch_rows(self.comm, fmt, fields, handle)
        return outputs, works, finish, handle

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

    def _check_low_latency_agreement(self, operation: str, device: torch.device, **sizes: int) -> None:
        """Where checks may synchronise (CPU, or DSINFRA_CHECKS=1): make sure
        every rank calls with the same sizes (one small all-gather)."""
        if not backend.range_checks_enabled(device):
            return
        mine = torch.tensor(list(sizes.values()), device=device)
        everyone = [torch.empty_like(mine) for _ in range(self.group_size)]
        dist.all_gather(everyone, mine, group=self.group)
        check_agreement(operation, [dict(zip(sizes, row)) for row in torch.stack(everyone).tolist()])

    @staticmethod
    def _event(works: list, finish: Callable[[], None], async_finish: bool) -> EventOverlap:
        event = EventHandle(works, finish)
        if not async_finish:
            event.current_stream_wait()
        return EventOverlap(event)

    @staticmethod
    def _low_latency_event(works, finish, async_finish: bool, return_recv_hook: bool):
        event = EventHandle(works, finish)
        if not (async_finish or return_recv_hook):
            event.current_stream_wait()
        return EventOverlap(event), event.current_stream_wait if return_recv_hook else None


def _wait(previous_event: EventOverlap | None) -> None:
    if previous_event is None:
        return
    if not isinstance(previous_event, EventOverlap):
        raise TypeError(f"previous_event must be an EventOverlap; got {type(previous_event).__name__}")
    previous_event.current_stream_wait()


def _check_config(config: Config | None) -> None:
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be a dsinfra.deep_ep.Config; got {type(config).__name__}")


def _check_handle_tokens(handle: DispatchHandle, num_tokens: int, name: str) -> None:
    if handle.is_token_in_rank.shape[0] != num_tokens:
        raise ValueError(f"{name} has {num_tokens} tokens but the handle was made for {handle.is_token_in_rank.shape[0]}")


def _as_x(outputs: list[torch.Tensor], is_fp8: bool):
    """The received fields in x's form: the tensor, or the FP8 pair."""
    return (outputs[0], outputs[1]) if is_fp8 else outputs[0]


def _layout_problem(topk_idx, num_experts, num_tokens_per_rank, tokens_to_rank, num_tokens_per_rdma_rank, tokens_to_node) -> str | None:
    """What is wrong with this rank's layout arguments (a device sync), or None."""
    try:
        if topk_idx is not None:
            check_range("topk_idx", topk_idx, 0, num_experts, ignore=-1)
    except ValueError as error:
        return f"dispatch: {error}"
    if not torch.equal(num_tokens_per_rank, tokens_to_rank.to(torch.int32)):
        return (
            f"dispatch: num_tokens_per_rank {num_tokens_per_rank.tolist()} does not match is_token_in_rank, "
            f"which sends {tokens_to_rank.tolist()}"
        )
    if num_tokens_per_rdma_rank is not None and not torch.equal(num_tokens_per_rdma_rank, tokens_to_node.to(torch.int32)):
        return (
            f"dispatch: num_tokens_per_rdma_rank {num_tokens_per_rdma_rank.tolist()} does not match is_token_in_rank, "
            f"which reaches nodes {tokens_to_node.tolist()}"
        )
    return None
