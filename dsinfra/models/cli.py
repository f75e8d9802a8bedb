"""Generate with a Hugging Face DeepSeek checkpoint (DeepSeek-V2, V3, R1,
V3.2: config.json + safetensors, bf16/fp16/fp32 or FP8 blocks): greedy, through
the paged latent cache and FlashMLA, MoE through DeepGEMM's grouped GEMMs.

    python -m dsinfra generate --model DIR --prompt-ids 1,2,3 --prompt-ids 4,5 --max-new-tokens 16
    python -m dsinfra generate --model DIR --prompt "Hello" --json out.json

--prompt needs DIR/tokenizer.json (read with the tokenizers package) and
prints text; --prompt-ids prints token ids. --json FILE writes
{"outputs": [[ids...], ...]}: the generated ids of each prompt, in order.

--ranks R runs R local processes with the routed experts spread over them
(deep_ep dispatch and combine; the prompts are shared out round-robin). The
experts start in order; after the prefill EPLB plans a placement from the
routing every rank recorded (with --redundant-experts extra slots for
replicas) and each rank reads its new experts from the checkpoint. Under
torchrun it runs on the processes torchrun started, across machines too:

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:29500 -m dsinfra generate --model DIR --prompt-ids 1,2,3

A directory that cannot be loaded (no config.json, an unsupported model_type
or field, a missing or truncated shard, shapes that disagree with the config)
ends the run with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from dsinfra.cli import CommandError

DTYPES = ("auto", "bfloat16", "float16", "float32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (config.json, *.safetensors)")
    parser.add_argument("--prompt-ids", action="append", default=[], metavar="IDS", help="a prompt as comma-separated token ids (repeatable)")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt as text, through DIR/tokenizer.json (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    parser.add_argument("--ranks", type=int, default=None, help="local processes the experts are spread over (default 1; torchrun: its world size)")
    parser.add_argument("--redundant-experts", type=int, default=None, help="extra expert slots for EPLB's replicas, a multiple of the ranks (default: one per rank)")
    parser.add_argument("--json", metavar="FILE", help='write {"outputs": [[ids...], ...]} here')
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="activations and float weights (default: the checkpoint's)")


@dataclasses.dataclass(frozen=True)
class Request:
    """What every rank needs to run its share of the prompts."""

    model: str
    prompts: list[list[int]]
    max_new_tokens: int
    dtype: str
    device: str
    redundant_experts: int | None


def run(args: argparse.Namespace) -> int:
    from dsinfra.models import CheckpointError, load_pretrained

    try:  # every tensor's name and shape, from the headers: nothing is read yet
        config = load_pretrained(args.model, device="meta").config
    except CheckpointError as error:
        raise CommandError(f"--model {args.model}: {error}") from None
    tokenizer = _tokenizer(args.model) if args.prompt else None
    prompts = _prompts(args, tokenizer, config.vocab_size)
    if args.max_new_tokens < 0:
        raise CommandError(f"--max-new-tokens must be >= 0; got {args.max_new_tokens}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CommandError("--device cuda: no CUDA device is available here")
    launched_by_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    world_size = int(os.environ["WORLD_SIZE"]) if launched_by_torchrun else (args.ranks or 1)
    if args.ranks is not None and args.ranks != world_size:
        raise CommandError(f"--ranks {args.ranks} differs from torchrun's world size {world_size}")
    if world_size < 1:
        raise CommandError(f"--ranks must be >= 1; got {world_size}")
    redundant = args.redundant_experts
    if world_size > 1 and config.num_moe_layers:
        if config.n_routed_experts % world_size:
            raise CommandError(f"--ranks {world_size}: the {config.n_routed_experts} routed experts do not split evenly over {world_size} ranks")
        if redundant is not None and (redundant < 0 or redundant % world_size):
            raise CommandError(f"--redundant-experts must be a multiple of the ranks ({world_size}); got {redundant}")
    request = Request(os.path.abspath(args.model), prompts, args.max_new_tokens, args.dtype, args.device, redundant)
    if launched_by_torchrun:
        outputs = _run_under_torchrun(request)
        if outputs is None:  # not rank 0
            return 0
    elif world_size == 1:
        outputs = generate_on_rank(0, 1, None, request)
    else:
        from dsinfra.testing import spawn

        backend = "nccl" if args.device == "cuda" else "gloo"
        outputs = spawn(generate_on_rank, world_size, request, backend=backend, timeout=3600)[0]
    _report(outputs, tokenizer, args.json)
    return 0


def _tokenizer(directory: str):
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise CommandError(f"--prompt needs {path}; give token ids with --prompt-ids instead")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise CommandError("--prompt needs the tokenizers package (pip install tokenizers)") from None
    try:
        return Tokenizer.from_file(path)
    except Exception as error:  # the tokenizers package raises its own exception types
        raise CommandError(f"{path} is not a readable tokenizer ({error})") from None


def _prompts(args: argparse.Namespace, tokenizer, vocab_size: int) -> list[list[int]]:
    if bool(args.prompt) == bool(args.prompt_ids):
        raise CommandError("give prompts either with --prompt-ids or with --prompt (one of them, repeatable)")
    if args.prompt:
        prompts = [tokenizer.encode(text).ids for text in args.prompt]
        for text, ids in zip(args.prompt, prompts):
            if not ids:
                raise CommandError(f"--prompt {text!r} encodes to no tokens")
    else:
        prompts = []
        for text in args.prompt_ids:
            try:
                ids = [int(part) for part in text.split(",") if part.strip()]
            except ValueError:
                raise CommandError(f"--prompt-ids must be comma-separated integers; got {text!r}") from None
            if not ids:
                raise CommandError(f"--prompt-ids {text!r} holds no token id")
            prompts.append(ids)
    for ids in prompts:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise CommandError(f"token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})")
    return prompts


def generate_on_rank(rank: int, world_size: int, group, request: Request) -> list[list[int]] | None:
    """Generate this rank's share of the prompts (every ``world_size``-th from
    ``rank``) with the experts spread over ``group`` (None: one process holds
    them all). Returns every prompt's output on rank 0 (gathered), None elsewhere."""
    import torch

    from dsinfra.models import load_pretrained
    from dsinfra.models.generation import generate

    dtype = None if request.dtype == "auto" else getattr(torch, request.dtype)
    device = torch.device("cuda", torch.cuda.current_device()) if request.device == "cuda" else torch.device("cpu")
    if group is None:
        model = load_pretrained(request.model, dtype=dtype, device=device)
        return generate(model, request.prompts, request.max_new_tokens)
    shares = [request.prompts[r::world_size] for r in range(world_size)]
    mine = shares[rank]
    model, after_prefill = _expert_parallel_model(request, rank, world_size, group, shares, dtype, device)
    outputs = generate(model, mine, request.max_new_tokens, group=group, after_prefill=after_prefill)
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, outputs, group=group)
    if rank != 0:
        return None
    merged = [None] * len(request.prompts)
    for r, share_outputs in enumerate(gathered):
        merged[r::world_size] = share_outputs
    return merged


def _expert_parallel_model(request: Request, rank: int, world_size: int, group, shares, dtype, device):
    """The model with this rank's experts in order, deep_ep dispatchers, and the
    EPLB step to run after the prefill (None without MoE layers)."""
    from dsinfra.eplb import ExpertLoadRecorder
    from dsinfra.models import load_pretrained
    from dsinfra.models.checkpoint import Checkpoint
    from dsinfra.models.expert_parallel import in_order_placement, rebalance, serve_expert_parallel

    config = Checkpoint(request.model).config
    if not config.num_moe_layers:
        return load_pretrained(request.model, dtype=dtype, device=device), None
    experts = config.n_routed_experts
    placement = in_order_placement(experts, rank, world_size, config.num_moe_layers)
    model = load_pretrained(request.model, dtype=dtype, device=device, expert_placement=placement)
    num_slots = experts + (world_size if request.redundant_experts is None else request.redundant_experts)
    max_prefill = max(sum(len(p) for p in share) for share in shares)
    max_decode = max(len(share) for share in shares)
    serve_expert_parallel(model, group, max_prefill, max_decode, num_slots)
    recorder = ExpertLoadRecorder(config.num_moe_layers, experts, window=1, device=device)
    for moe in model.moe_layers():
        moe.recorder = recorder

    def after_prefill() -> None:
        for moe in model.moe_layers():
            moe.recorder = None
        rebalance(model, group, recorder, num_slots)

    return model, after_prefill


def _run_under_torchrun(request: Request):
    import torch
    import torch.distributed as dist

    if request.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if request.device == "cuda" else "gloo")
    try:
        return generate_on_rank(dist.get_rank(), dist.get_world_size(), dist.group.WORLD, request)
    finally:
        dist.destroy_process_group()


def _report(outputs: list[list[int]], tokenizer, json_path: str | None) -> None:
    for index, ids in enumerate(outputs):
        shown = tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))
        print(f"[{index}] {shown}")
    if json_path:
        try:
            with open(json_path, "w") as f:
                json.dump({"outputs": outputs}, f)
        except OSError as error:
            raise CommandError(f"--json {json_path}: {error.strerror}") from None
        print(f"wrote {json_path}", file=sys.stderr)
