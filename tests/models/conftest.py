"""Tiny DeepSeek checkpoints saved with transformers' own classes, built once
per test session on first use (see dsinfra.testing.checkpoints)."""

import pytest
import torch

# name -> (model_type, save_tiny_checkpoint's options)
CHECKPOINTS = {
    "v2": ("deepseek_v2", {}),
    "v3": ("deepseek_v3", {}),
    "v32": ("deepseek_v32", {}),
    "v3-bf16": ("deepseek_v3", {"dtype": torch.bfloat16}),
    "v3-sharded": ("deepseek_v3", {"max_shard_size": "100KB"}),
    "v3-fp8": ("deepseek_v3", {"fp8": True}),
    "v32-fp8": ("deepseek_v32", {"fp8": True}),
}


class TinyCheckpoints:
    def __init__(self, root):
        self.root = root
        self.paths = {}

    def __call__(self, name: str) -> str:
        if name not in self.paths:
            from dsinfra.testing.checkpoints import save_tiny_checkpoint

            model_type, options = CHECKPOINTS[name]
            self.paths[name] = save_tiny_checkpoint(self.root / name, model_type, seed=0, **options)
        return self.paths[name]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> the path of that tiny checkpoint (all share seed 0:
    "v3", "v3-bf16", "v3-sharded" and "v3-fp8" hold the same model)."""
    pytest.importorskip("transformers")
    import transformers

    transformers.logging.set_verbosity_error()
    return TinyCheckpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture
def one_thread():
    """The tiny models' operations take microseconds: one thread, as waking a
    second one per operation costs more than it saves (far more on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
