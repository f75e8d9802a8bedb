"""Expert-parallel load balancing with DeepSeek EPLB's API: replicate heavy
experts and place the replicas so that GPUs carry even loads.

    from dsinfra import eplb
    recorder = eplb.ExpertLoadRecorder(num_layers, num_experts, window=32)
    ...  # recorder.record(layer, topk_idx) in every MoE layer, recorder.step() after every batch
    phy2log, log2phy, logcnt = eplb.rebalance_experts(recorder.weight(group), num_replicas, num_groups, num_nodes, num_gpus)
    slots = eplb.route_to_replicas(topk_idx, log2phy[layer], logcnt[layer])

The planner runs on the CPU (numpy); recording and routing run on any device.
"""

from dsinfra.eplb.loads import gpu_loads, imbalance, in_order_gpu_loads, slot_loads
from dsinfra.eplb.planner import logical_to_physical_map, rebalance_experts
from dsinfra.eplb.recorder import ExpertLoadRecorder
from dsinfra.eplb.routing import route_to_replicas

__all__ = [
    "ExpertLoadRecorder",
    "gpu_loads",
    "imbalance",
    "in_order_gpu_loads",
    "logical_to_physical_map",
    "rebalance_experts",
    "route_to_replicas",
    "slot_loads",
]
