"""The one place that decides which implementation serves a call.

Every kernel component has three implementations of its operations:

- ``reference``: ``<component>/reference.py``, plain PyTorch, the specification;
- ``torch``: ``<component>/torch_impl.py``, the fast vectorised CPU path;
- ``triton``: ``<component>/triton_impl.py``, the GPU path (Triton kernels).

``DSINFRA_BACKEND`` (``auto``, ``triton``, ``torch`` or ``reference``; default
``auto``) picks one. ``auto`` takes ``triton`` for tensors on a GPU when Triton
imports, and ``torch`` otherwise. ``triton`` on CPU tensors runs Triton's
interpreter, which needs ``TRITON_INTERPRET=1`` set before Triton is imported;
without it :func:`choose` raises.

A public operation validates its arguments, then::

    impl = backend.load(__name__, backend.choose("flash_mla_with_kvcache", q.device))
    return impl.flash_mla_with_kvcache(...)

The variable is read on every call, so it can be changed between calls.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

IMPLEMENTATIONS = ("reference", "torch", "triton")
CHOICES = ("auto",) + IMPLEMENTATIONS
MODULE_OF = {"reference": "reference", "torch": "torch_impl", "triton": "triton_impl"}


def requested() -> str:
    """The value of ``DSINFRA_BACKEND`` (``auto`` when unset), validated."""
    value = os.environ.get("DSINFRA_BACKEND", "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(
            f"DSINFRA_BACKEND must be one of {', '.join(CHOICES)}; got {os.environ['DSINFRA_BACKEND']!r}"
        )
    return value


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set: Triton kernels then run on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_version() -> str | None:
    """Triton's version, or None when it does not import."""
    try:
        import triton
    except Exception:  # ImportError, or a broken install raising anything else
        return None
    return triton.__version__


def is_gpu(device: torch.device | str) -> bool:
    """Whether Triton compiles for this device: NVIDIA GPUs, and AMD GPUs
    (which PyTorch's ROCm build also calls ``cuda``)."""
    return torch.device(device).type == "cuda"


def choose(operation: str, device: torch.device | str) -> str:
    """The implementation (``reference``, ``torch`` or ``triton``) that serves
    ``operation`` on tensors living on ``device``.

    Raises RuntimeError when ``triton`` is requested where it cannot run.
    """
    device = torch.device(device)
    wanted = requested()
    if wanted == "auto":
        return "triton" if is_gpu(device) and triton_version() is not None else "torch"
    if wanted == "triton":
        if triton_version() is None:
            raise RuntimeError(f"{operation}: DSINFRA_BACKEND=triton but Triton does not import; pip install triton")
        if not is_gpu(device) and not interpreting():
            raise RuntimeError(
                f"{operation}: DSINFRA_BACKEND=triton on {device.type} tensors needs TRITON_INTERPRET=1 "
                "set before Triton is imported (Triton's interpreter runs the kernels on the CPU)"
            )
    return wanted


def load(package: str, implementation: str) -> ModuleType:
    """The module of ``package`` (e.g. ``dsinfra.flash_mla``) that holds ``implementation``."""
    if implementation not in MODULE_OF:
        raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}; got {implementation!r}")
    return importlib.import_module(f"{package}.{MODULE_OF[implementation]}")


def range_checks_enabled(device: torch.device | str) -> bool:
    """Whether checks that need a device sync (index ranges) run: always on the
    CPU, on other devices only with ``DSINFRA_CHECKS=1``."""
    return torch.device(device).type == "cpu" or os.environ.get("DSINFRA_CHECKS", "0") == "1"


def num_parallel_units(device: torch.device | str) -> int:
    """How many independent workers a kernel launch can keep busy: streaming
    multiprocessors on a GPU, intra-op threads on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).multi_processor_count
    return torch.get_num_threads()


@functools.lru_cache(maxsize=None)
def native_cpu_matmul(dtype: torch.dtype) -> bool:
    """Whether oneDNN multiplies ``dtype`` (bf16 or fp16) matrices natively on this
    CPU (AVX512-BF16 or AMX for bf16, AVX512-FP16 or AMX-FP16 for fp16). Without
    it such a matmul is a scalar loop, hundreds of times slower than a float32 one,
    so CPU paths multiply in float32 instead."""
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError, TypeError):  # an older or leaner PyTorch build
        return False
