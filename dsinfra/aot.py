"""Ahead-of-time compilation of a kernel launch for a GPU this machine need not have,
and what the binary shows: registers, spills, shared memory, tensor-core and
async-copy instructions.

:func:`specialise` types a launch's arguments with the JIT's own code (the
binder Triton builds for each kernel and its ``_pack_args``), so the compiled
kernel is the one a GPU would run: ints equal to 1 become constants, ints
divisible by 16 and 16-byte aligned pointers get the divisibility-16 hint, and
on AMD tensors under 2 GiB get the 32-bit pointer-range hint that buffer loads
need. Pointers come from ``meta`` tensors, whose ``data_ptr()`` is their storage
offset in bytes: the alignment of a view into an allocation (which the CUDA
caching allocator aligns to 512 bytes).

:func:`inspect_binary` reads the compiled kernel:

- NVIDIA: registers and stack frame (spills) from the cubin's resource usage,
  shared memory as Triton's dynamic allocation plus the cubin's static one, and the
  SASS instructions through ``cuobjdump`` (bundled with Triton): tensor cores
  ``HGMMA``/``QGMMA`` (Hopper warpgroup MMA, bf16/fp16 and FP8), ``HMMA`` (mma.sync
  bf16/fp16), ``QMMA`` (mma.sync FP8, sm_89), ``IMMA``; async copies ``LDGSTS``
  (cp.async) and ``UTMALDG``/``UBLKCP`` (TMA).
- AMD: VGPRs, scratch (spill) bytes and LDS from the code object's metadata in the
  AMDGCN assembly; tensor cores ``MFMA`` with their operand type (``MFMA.fp8``
  ...); async copies as loads straight into LDS (``buffer_load ... lds``,
  ``global_load_lds``), which is what Triton emits for asynchronous copies on AMD.
  Plain ``buffer_load`` (32-bit offsets from a buffer descriptor) is the usual
  fast global load there and is not counted as an async copy.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import triton

from dsinfra.triton_utils import Launch, Target


@dataclasses.dataclass
class Specialised:
    """A launch typed as the JIT types it: what ``triton.compile`` takes."""

    kernel: Any
    signature: dict[str, str]
    constexprs: dict
    attrs: dict
    options: dict[str, Any]

    def key(self) -> str:
        """Identical keys compile to identical kernels."""
        return repr((self.kernel.__name__, sorted(self.signature.items()), sorted(self.constexprs.items(), key=repr),
                     sorted(self.attrs.items(), key=repr), sorted(self.options.items())))


def specialise(launch: Launch, target: Target) -> Specialised:
    """Type ``launch``'s arguments for ``target`` with the JIT's binder."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    compiler = make_backend(target.gpu_target())
    binder = create_function_from_signature(kernel.signature, kernel.params, compiler)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(compiler, launch.kwargs, bound, specialization, options)
    return Specialised(kernel, signature, constexprs, attrs, dict(options.__dict__))


def compile_specialised(spec: Specialised, target: Target):
    """``triton.compile`` of a specialised launch (cached in Triton's cache directory)."""
    from triton.compiler import ASTSource

    source = ASTSource(spec.kernel, spec.signature, spec.constexprs, spec.attrs)
    return triton.compile(source, target=target.gpu_target(), options=spec.options)


@dataclasses.dataclass
class Binary:
    """What a compiled kernel needs and uses."""

    registers: int  # per thread (VGPRs on AMD)
    spill_bytes: int  # stack frame (NVIDIA) or scratch (AMD) per thread
    shared_bytes: int  # per program
    tensor_core: str  # instruction families, "+"-joined; "" when none
    async_copy: bool
    instructions: Counter  # mnemonic -> count


_NVIDIA_TENSOR_CORES = ("HGMMA", "QGMMA", "IGMMA", "HMMA", "QMMA", "IMMA")
_NVIDIA_ASYNC_COPIES = ("LDGSTS", "UTMALDG", "UBLKCP")


def _cuobjdump(*arguments: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return subprocess.run([str(tool), *arguments], capture_output=True, text=True, check=True).stdout


def _nvidia(compiled) -> Binary:
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        with open(cubin, "wb") as out:
            out.write(compiled.asm["cubin"])
        usage = _cuobjdump("--dump-resource-usage", cubin)
        sass = _cuobjdump("--dump-sass", cubin)
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    mnemonics = Counter(
        match.split(".")[0]
        for match in re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    )
    return Binary(
        registers=int(fields.get("REG", 0)),
        spill_bytes=int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0)),
        shared_bytes=int(compiled.metadata.shared) + int(fields.get("SHARED", 0)),
        tensor_core="+".join(family for family in _NVIDIA_TENSOR_CORES if mnemonics[family]),
        async_copy=any(mnemonics[name] for name in _NVIDIA_ASYNC_COPIES),
        instructions=mnemonics,
    )


def _amd(compiled) -> Binary:
    assembly = compiled.asm["amdgcn"]

    def field(name: str) -> int:
        found = re.search(rf"^\s*-?\s*\.{name}:\s+(\d+)", assembly, re.MULTILINE)
        return int(found.group(1)) if found else 0

    instructions = Counter(re.findall(r"^\s+([sv]_\w+|buffer_\w+|global_\w+|ds_\w+)", assembly, re.MULTILINE))
    mfma_types = sorted({m.group(1) for m in re.finditer(r"^\s+v_mfma_\w+?_(fp8|bf8|bf16|f16|f32|xf32|i8)\w*", assembly, re.MULTILINE)})
    async_copy = bool(re.search(r"^\s+(buffer_load_\w+[^\n]*\blds\b|global_load_lds_\w+)", assembly, re.MULTILINE))
    return Binary(
        registers=field("vgpr_count"),
        spill_bytes=field("private_segment_fixed_size"),
        shared_bytes=int(compiled.metadata.shared),
        tensor_core="+".join(f"MFMA.{kind}" for kind in mfma_types),
        async_copy=async_copy,
        instructions=instructions,
    )


def inspect_binary(compiled, target: Target) -> Binary:
    """Registers, spills, shared memory and instruction families of a compiled kernel."""
    return _nvidia(compiled) if target.backend == "cuda" else _amd(compiled)
