"""A Hugging Face checkpoint directory, read lazily: :class:`Checkpoint`.

config.json (see :mod:`dsinfra.models.checkpoint_config`) and safetensors
weights, one ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Opening reads only the files' headers, which
safetensors checks against the files' sizes (a truncated shard is refused
there); a tensor's bytes are read from the memory-mapped file when
:meth:`Checkpoint.read` asks for it, so a rank reads only the weights it keeps.
Every problem is a :class:`CheckpointError` with a one-line message.
"""

from __future__ import annotations

import json
import os

import torch

from dsinfra.models.checkpoint_config import CheckpointConfig, CheckpointError, parse_config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F8_E4M3": torch.float8_e4m3fn}


class Checkpoint:
    """The weights and config of the checkpoint in directory ``path``."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path} is not a directory")
        self.config: CheckpointConfig = parse_config(_read_json(os.path.join(self.path, "config.json"), "config.json"))
        self._files = {}  # file name -> safetensors handle
        self._where = {}  # tensor name -> file name
        for file, names in self._layout().items():
            handle = self._open(file)
            missing = set(names) - set(handle.keys()) if names is not None else set()
            if missing:
                raise CheckpointError(f"{file} lacks {min(missing)}, which {INDEX_FILE} places there")
            for name in handle.keys() if names is None else names:
                self._where[name] = file

    def _layout(self) -> dict[str, list[str] | None]:
        """file -> the tensor names the index places in it (None: all it holds)."""
        index_path = os.path.join(self.path, INDEX_FILE)
        if os.path.exists(index_path):
            weight_map = _read_json(index_path, INDEX_FILE).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{INDEX_FILE} has no weight_map")
            files: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                files.setdefault(file, []).append(name)
            return files
        if os.path.exists(os.path.join(self.path, SINGLE_FILE)):
            return {SINGLE_FILE: None}
        raise CheckpointError(f"{self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}")

    def _open(self, file: str):
        from safetensors import SafetensorError, safe_open

        full = os.path.join(self.path, file)
        if not os.path.isfile(full):
            raise CheckpointError(f"safetensors file {file} is missing")
        try:
            handle = safe_open(full, framework="pt")
        except SafetensorError as error:  # a truncated or corrupt file: its header does not match its size
            raise CheckpointError(f"{file} is not a readable safetensors file ({error})") from None
        self._files[file] = handle
        return handle

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return sorted(self._where)

    def _slice(self, name: str):
        if name not in self._where:
            raise CheckpointError(f"the checkpoint lacks {name}")
        return self._files[self._where[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the header (nothing is read)."""
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """A tensor's dtype, from the header (nothing is read)."""
        code = self._slice(name).get_dtype()
        if code not in _DTYPES:
            raise CheckpointError(f"{name} has dtype {code}, which dsinfra does not read")
        return _DTYPES[code]

    def read(self, name: str, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``name``; with ``shape``, checked first (from the header);
        with ``dtype``, converted (FP8 tensors are never converted)."""
        if shape is not None and self.shape(name) != tuple(shape):
            raise CheckpointError(
                f"{name} has shape {list(self.shape(name))} in the checkpoint; the config implies {list(shape)}"
            )
        tensor = self._slice(name)[:]
        if dtype is not None and tensor.dtype != dtype and tensor.dtype != torch.float8_e4m3fn:
            tensor = tensor.to(dtype)
        return tensor


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{os.path.dirname(path) or '.'} has no {what}") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{what} is not readable JSON ({error})") from None
