"""DualPipe and DualPipeV (deepseek-ai/DualPipe's API) on torch.distributed,
with the schedules as data and a simulator that runs them.

    from dsinfra.dualpipe import DualPipe, DualPipeV, set_p2p_tensor_shapes, set_p2p_tensor_dtype

- :mod:`~dsinfra.dualpipe.schedule`: each rank's list of operations for 1F1B,
  ZB1P, DualPipe and DualPipeV;
- :mod:`~dsinfra.dualpipe.simulator`: runs those lists under a cost model;
- :class:`DualPipe`, :class:`DualPipeV`: execute the same lists on real modules.
"""

from dsinfra.dualpipe.comm import set_p2p_tensor_dtype, set_p2p_tensor_shapes
from dsinfra.dualpipe.dualpipe import DualPipe, DualPipeV
from dsinfra.dualpipe.zero_bubble import WeightGradStore, ZeroBubbleLinear

__all__ = ["DualPipe", "DualPipeV", "WeightGradStore", "ZeroBubbleLinear", "set_p2p_tensor_dtype", "set_p2p_tensor_shapes"]
