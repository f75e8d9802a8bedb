"""The adaptations that let DeepSeek's tests run on dsinfra, as data: each a
named rule with the reason it changes no check, applied to the upstream files
it names.

A file is named ``Repo@commit:path`` (``DeepEP@77bb07a:tests/utils.py``);
a rule's ``files`` are shell-style patterns over those names. Three kinds:

- :class:`Replace`: a regular expression substitution in every matching
  Python file the runner extracts (the test and its helpers). A replacement
  may never touch a line of an ``assert`` statement: :func:`adapt_source`
  refuses it. ``required`` rules must match in every file they name, so that
  a rule gone stale with a new upstream commit says so.
- :class:`Patch`: before the test's own code runs, a dotted name (say
  ``torch.cuda.synchronize``) is replaced by a stand-in from
  :mod:`dsinfra.conformance.standins`.
- :class:`Environment`: variables set for the run.

Imports need no rule: the runner runs every file under ``python -m dsinfra
run``, so ``flash_mla``, ``deep_gemm``, ``deep_ep``, ``dualpipe`` and
``eplb`` are dsinfra's (:mod:`dsinfra.alias`).
"""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import re
from collections.abc import Sequence


class RuleError(ValueError):
    """A rule that cannot be applied as written (it touches an assertion, or a required match is missing)."""


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    why: str
    files: tuple[str, ...]

    def applies_to(self, file: str) -> bool:
        return any(fnmatch.fnmatchcase(file, pattern) for pattern in self.files)


@dataclasses.dataclass(frozen=True)
class Replace(Rule):
    pattern: str = ""
    replacement: str = ""
    required: bool = False


@dataclasses.dataclass(frozen=True)
class Patch(Rule):
    stand_ins: tuple[tuple[str, str], ...] = ()  # (dotted name, stand-in in dsinfra.conformance.standins)


@dataclasses.dataclass(frozen=True)
class Environment(Rule):
    variables: tuple[tuple[str, str], ...] = ()


ALL = ("*",)
TIMING = "timing: a stand-in measures the wall clock and runs the function once; timings are printed, never checked"

RULES: list[Rule] = [
    # -- device -------------------------------------------------------------
    Replace(
        "cuda-device-strings", "device: dsinfra runs the same computation on the CPU; no check depends on the device's name",
        ALL, pattern=r"(?<![\w.])f?(['\"])cuda(?::[^'\"]*)?\1", replacement="'cpu'",
    ),
    Patch(
        "cuda-device-calls", "device: device selection, seeding of CUDA's generators (the tests seed the CPU's as well), "
        "synchronisation, memory statistics and profiler ranges have nothing to do on a CPU; .cuda() leaves a tensor where it is",
        ALL, stand_ins=(
            ("torch.cuda.set_device", "no_op"), ("torch.cuda.synchronize", "no_op"),
            ("torch.cuda.manual_seed", "no_op"), ("torch.cuda.manual_seed_all", "no_op"),
            ("torch.cuda.reset_peak_memory_stats", "no_op"),
            ("torch.cuda.nvtx.range_push", "no_op"), ("torch.cuda.nvtx.range_pop", "no_op"),
            ("torch.Tensor.cuda", "stay_on_cpu"),
        ),
    ),
    Patch(
        "hopper-capability", "device: the tests pick their cases by GPU generation; dsinfra answers sm90, the Hopper "
        "GPUs they were written for, so the Hopper cases run (no kernel is compiled for it)",
        ALL, stand_ins=(("torch.cuda.get_device_capability", "hopper_capability"),),
    ),
    Patch(
        "devices-are-ranks", "launcher: tests that start one process per GPU start one per device count "
        "(DSINFRA_CONFORMANCE_DEVICES, default 8: one node)", ALL,
        stand_ins=(("torch.cuda.device_count", "device_count"),),
    ),
    Replace(
        "nccl-to-gloo", "communication: gloo is torch.distributed's CPU backend; the same collectives, the same results",
        ALL, pattern=r"(['\"])nccl\1", replacement="'gloo'",
    ),
    Patch(
        "stacked-all-gather", "communication: NCCL's all_gather_into_tensor also fills an output of the ranks' "
        "tensors stacked, gloo's only one concatenated along dimension 0; the stacked output is passed as the "
        "concatenated view of the same memory: the same bytes arrive in the same places",
        ALL, stand_ins=(("torch.distributed.all_gather_into_tensor", "all_gather_into_tensor"),),
    ),
    Replace(
        "machine-threads", "speed: the machine's own thread count instead of a fixed one (32 threads on fewer cores only slow down)",
        ALL, pattern=r"torch\.set_num_threads\(\s*\d+\s*\)", replacement="torch.set_num_threads(torch.get_num_threads())",
    ),
    # -- timing -------------------------------------------------------------
    Patch(
        "wall-clock-timers", TIMING, ALL,
        stand_ins=(("torch.cuda.Event", "WallClockEvent"), ("triton.testing.do_bench", "do_bench")),
    ),
    Patch(
        "deep-ep-test-timers", TIMING, ("DeepEP@77bb07a:tests/test_*.py",),
        stand_ins=(("utils.bench", "bench"), ("utils.bench_kineto", "bench_kineto")),
    ),
    Patch(
        "deep-ep-library-timers", TIMING, ("DeepEP@*:tests/legacy/test_*.py",),
        stand_ins=(("deep_ep.utils.testing.bench", "bench"), ("deep_ep.utils.testing.bench_kineto", "bench_kineto")),
    ),
    Patch(
        "deep-gemm-timers", TIMING, ("DeepGEMM@*:tests/test_*.py",),
        stand_ins=(
            ("deep_gemm.bench_kineto", "bench_kineto"),
            ("deep_gemm.testing.bench_kineto", "bench_kineto"), ("deep_gemm.testing.bench", "bench_seconds"),
        ),
    ),
    Patch(
        "flash-mla-kernelkit-timers", TIMING, ("FlashMLA@*:tests/test_*.py",),
        stand_ins=(("kernelkit.bench_kineto", "kernelkit_bench_kineto"), ("kernelkit.bench_by_cuda_events", "bench_by_events")),
    ),
    Environment(
        "no-cooldown", "timing: FlashMLA's pause between cases lets a GPU cool down; its own switch turns it off",
        ("FlashMLA@*:tests/test_*.py",), variables=(("NO_COOLDOWN", "1"),),
    ),
    # -- sizes --------------------------------------------------------------
    Replace(
        "flash-mla-batch-16", "size: batches of 16 instead of 128 (hours on a CPU otherwise); the sequence lengths, "
        "head counts and tolerances stay upstream's",
        ("FlashMLA@1aef31d:tests/test_flash_mla.py",), pattern=r"for b in \[128\]", replacement="for b in [16]", required=True,
    ),
    Replace(
        "flash-mla-test-param-batch-16", "size: batches of 16 instead of 128 in the corner and performance cases "
        "(hours on a CPU otherwise); lengths, heads and tolerances stay upstream's",
        ("FlashMLA@1858932:tests/test_flash_mla_decoding.py", "FlashMLA@9241ae3:tests/test_flash_mla_dense_decoding.py"),
        pattern=r"TestParam\(128,", replacement="TestParam(16,", required=True,
    ),
    Replace(
        "flash-mla-dense-batch-16", "size: batches of 16 instead of 64 in the correctness cases (over 40 minutes on "
        "a CPU otherwise); lengths, heads and tolerances stay upstream's",
        ("FlashMLA@9241ae3:tests/test_flash_mla_dense_decoding.py",),
        pattern=r"for b in \[1, 2, 6, 64\]", replacement="for b in [1, 2, 6, 16]", required=True,
    ),
    Replace(
        "flash-mla-dense-reference-grouped-heads", "speed: the test's reference lets the query heads of a group share "
        "their KV head by reshaping the queries to (KV heads, group x queries) instead of copying each KV head once "
        "for every query head with repeat_interleave; the same float32 dot products, up to the order of their sums "
        "(lse within 1e-6 of the copying reference, outputs within one bfloat16 rounding step, far inside the "
        "test's tolerances), without a 1.2 GB copy a sequence: with 128 query heads on 8 KV heads of 4096 keys the "
        "reference took 45 s a case against 1.5 s for flash_mla", ("FlashMLA@9241ae3:tests/test_flash_mla_dense_decoding.py",),
        pattern=r"if h_kv != 1:\n\s+kv = kv\.repeat_interleave\(h_q // h_kv, dim=0\)\n(\s+)kv\[kv != kv\] = 0\.0\n\s+"
        r"attn_weight = query @ kv\.transpose\(-2, -1\)((?:.*\n)*?.*)output = attn_weight @ kv\[\.\.\., :dv\]",
        replacement=r"kv[kv != kv] = 0.0\n\1attn_weight = (query.reshape(h_kv, -1, query.size(-1)) @ "
        r"kv.transpose(-2, -1)).view(h_q, s_q, s_k)\2output = (attn_weight.reshape(h_kv, h_q // h_kv * s_q, s_k) "
        r"@ kv[..., :dv]).view(h_q, s_q, dv)", required=True,
    ),
    Replace(
        "flash-mla-sparse-batches", "size: batches of 5 and 6 instead of 74 and 321 in the correctness cases: the "
        "test's own data generator draws each case's cache with torch.randn under a bfloat16 default dtype, about "
        "45 s a case at 321 on 2 cores, for 4748 cases; lengths, heads, top-k, block sizes and tolerances stay upstream's",
        ("FlashMLA@9241ae3:tests/test_flash_mla_sparse_decoding.py",),
        pattern=r"for b in \[4, 74, 321\]", replacement="for b in [4, 5, 6]", required=True,
    ),
    Replace(
        "flash-mla-sparse-varlen-batch", "size: with flash-mla-sparse-batches, the middle batch (5 for 74) is still "
        "the one also run with sequences of equal length", ("FlashMLA@9241ae3:tests/test_flash_mla_sparse_decoding.py",),
        pattern=r"\(b == 74 and", replacement="(b == 5 and", required=True,
    ),
    Replace(
        "flash-mla-sparse-performance-batches", "size: batches of 2, 8, 9 and 16 instead of 2, 64, 74, 128 (and 148 and "
        "256 for the MODEL1 configurations) in the performance cases, which check their results too: at 256 sequences "
        "of 16384 keys on average the test's own generator draws a bf16 cache of some 6 GB per KV cache, and "
        "quantises it with float32 copies; lengths, top-k, heads, block sizes and tolerances stay upstream's",
        ("FlashMLA@9241ae3:tests/test_flash_mla_sparse_decoding.py",),
        pattern=r"\[2, 64, 74, 128(, 74\*2, 256)?\]", replacement="[2, 8, 9, 16]", required=True,
    ),
    Replace(
        "flash-mla-sparse-peak-batch", "size: batches of 18 instead of 148 in the peak-performance cases (16384 of "
        "32768 keys a query), which check their results too: the test's own reference gathers every query's keys in "
        "float32, 148 x 2 x 16384 x 576 floats (11 GB); lengths, top-k, heads and tolerances stay upstream's",
        ("FlashMLA@9241ae3:tests/test_flash_mla_sparse_decoding.py",),
        pattern=r"RawTestParam\(74\*2, h_q,", replacement="RawTestParam(18, h_q,", required=True,
    ),
    Replace(
        "flash-mla-sparse-prefill-queries", "size: 256 queries instead of 4096 in the performance cases, and 123, 256 "
        "and 64 instead of 1234, 4096 and 1024 in the corner cases with 2048 to 8192 keys a query: the test's own "
        "reference gathers every query's keys in float32 (4096 x 2048 x 576 floats, 19 GB); key counts, top-k, heads, "
        "head dims, features and tolerances stay upstream's", ("FlashMLA@9241ae3:tests/test_flash_mla_sparse_prefill.py",),
        pattern=r"\(1234, 4321, 4096\),(\s+)\(4096, 2048, 2048\)((?:.*\n)*?.*)for s_q in \[1, 1024\]((?:.*\n)*?.*)"
        r"for s_q in \[4096\]",
        replacement=r"(123, 4321, 4096),\1(256, 2048, 2048)\2for s_q in [1, 64]\3for s_q in [256]", required=True,
    ),
    Replace(
        "flash-mla-sparse-prefill-grid-case", "size: 7000 queries instead of 70000 in the case upstream keeps for CUDA's "
        "limit of 65535 blocks in a grid dimension, which a CPU does not have; the case checks no result, and at "
        "upstream's size its bf16 inputs alone take 19 GB", ("FlashMLA@9241ae3:tests/test_flash_mla_sparse_prefill.py",),
        pattern=r"TestParam\(70000, 256, 256,", replacement="TestParam(7000, 256, 256,", required=True,
    ),
    Replace(
        "deep-gemm-dense-tokens", "size: 1024 rows (tokens) instead of 4096 in the largest dense GEMMs (each takes "
        "minutes on a CPU); N, K and the tolerance stay upstream's",
        ("DeepGEMM@fbec9e5:tests/test_core.py", "DeepGEMM@9da4a23:tests/generators.py", "DeepGEMM@54e2261:tests/test_attention.py"),
        pattern=r"for m in \(((?:\d+, )+)4096\):", replacement=r"for m in (\g<1>1024):", required=True,
    ),
    Replace(
        "deep-gemm-dense-token-lists", "size: as deep-gemm-dense-tokens, where the generator lists the rows of its "
        "forward and backward GEMMs: 1024 instead of 4096 (each GEMM with N=129280 takes minutes on a CPU); N, K and "
        "the tolerance stay upstream's", ("DeepGEMM@54e2261:tests/generators.py",),
        pattern=r"m_fwd_list, m_bwd_list = \[((?:\d+, )+)4096\], \[4096, \]",
        replacement=r"m_fwd_list, m_bwd_list = [\g<1>1024], [1024, ]", required=True,
    ),
    Replace(
        "deep-gemm-grouped-tokens", "size: 1024 and 512 rows per group instead of 8192 and 4096 in the contiguous "
        "grouped GEMMs (still multiples of the 128-row alignment); groups, N, K and the tolerance stay upstream's",
        ("DeepGEMM@fbec9e5:tests/test_core.py", "DeepGEMM@9da4a23:tests/generators.py"),
        pattern=r"\(4, 8192(, \d+, \d+\)), \(4, 8192(, \d+, \d+\)), \(8, 4096(, \d+, \d+\)), \(8, 4096(, \d+, \d+\))",
        replacement=r"(4, 1024\1, (4, 1024\2, (8, 512\3, (8, 512\4", required=True,
    ),
    Replace(
        "deep-gemm-grouped-token-lists", "size: as deep-gemm-grouped-tokens, where the generator lists the groups "
        "and rows once: 1024 and 512 rows per group instead of 8192 and 4096", ("DeepGEMM@54e2261:tests/generators.py",),
        pattern=r"m_group_list = \[\(4, 8192\), \(8, 4096\)\]", replacement="m_group_list = [(4, 1024), (8, 512)]",
        required=True,
    ),
    Replace(
        "deep-gemm-k-grouped-tokens", "size: 1024, 512 and 256 tokens per group (the K of each group) instead of "
        "8192, 4096 and 2048 in the K-grouped GEMMs (weight gradients: 4096 x 7168 outputs over 32768 tokens take "
        "minutes each on a CPU); still multiples of the 128 alignment, drawn as upstream draws them; groups, M, N "
        "and the tolerance stay upstream's", ("DeepGEMM@54e2261:tests/generators.py",),
        pattern=r"\(\( 4, 4096, 7168, 8192\), \( 4, 7168, 2048, 8192\),(.*\n\s*)"
        r"\( 8, 4096, 7168, 4096\), \( 8, 7168, 2048, 4096\),(.*\n\s*)"
        r"\(16, 4096, 7168, 2048\), \(16, 7168, 2048, 2048\)\)",
        replacement=r"(( 4, 4096, 7168, 1024), ( 4, 7168, 2048, 1024),\1( 8, 4096, 7168, 512), ( 8, 7168, 2048, 512),"
        r"\2(16, 4096, 7168, 256), (16, 7168, 2048, 256))", required=True,
    ),
    Replace(
        "deep-gemm-masked-rows", "size: room for 1536 rows per group instead of 4096 in the masked grouped GEMMs; "
        "the masked (used) rows, at most 1.3 x 1024, are upstream's, and so are N, K and the tolerance: the test's "
        "own reference multiplies every room row, in bfloat16, which takes hours on a CPU without bfloat16 arithmetic",
        ("DeepGEMM@9da4a23:tests/generators.py",),
        pattern=r"\bmax_m = 4096\b", replacement="max_m = 1536", required=True,
    ),
    Replace(
        "deep-gemm-masked-room", "size: room for 1.3 times the expected rows of a group, rounded up to 128 (256, "
        "1408 and 128 rows for 192, 1024 and 20 expected), instead of 4096 rows for every masked grouped GEMM; the "
        "masked (used) rows are drawn as upstream draws them, at most 1.3 times the expected, so they always fit and "
        "rows past them are still left unread; groups, N, K and the tolerance stay upstream's: the test's own "
        "reference and casts work on every room row (32 groups x 4096 rows x 6144 x 7168 is 12 TFLOP a draw)",
        ("DeepGEMM@54e2261:tests/generators.py",),
        pattern=r"yield kernel_type, quant_config, num_groups, max_m, m, n, k, use_psum_layout",
        replacement="yield kernel_type, quant_config, num_groups, align(int(m * 1.3), 128), m, n, k, use_psum_layout",
        required=True,
    ),
    Replace(
        "deep-gemm-masked-draws", "size: 2 draws instead of 8 of each masked grouped GEMM; every draw is the same "
        "check on fresh random data, and with 32 groups of 6144 x 7168 weights one draw makes, casts and multiplies "
        "1.4 G bfloat16 values in the test's own code, about 40 s on one core; shapes and tolerances stay upstream's",
        ("DeepGEMM@54e2261:tests/test_fp8_fp4.py", "DeepGEMM@54e2261:tests/test_bf16.py"),
        pattern=r"\bnum_tests = 8\b", replacement="num_tests = 2", required=True,
    ),
    Replace(
        "deep-gemm-float32-reference-products", "speed: the generator's reference products of bfloat16 operands are "
        "taken as float32 products rounded once to bfloat16, which is what torch computes for a bfloat16 matmul "
        "(float32 sums, one rounding), up to the order of the float32 sums; on a CPU without bfloat16 arithmetic that "
        "is 11 times faster (5 against 57 GFLOP/s on one core of this machine); the values checked against stay the "
        "same to float32 precision, far inside the tolerances", ("DeepGEMM@54e2261:tests/generators.py",),
        pattern=r"\b(a(?:_g|\[[^\]]*\])(?:\.T)?) @ (b(?:_g|\[[^\]]*\])(?:\.t\(\))?)",
        replacement=r"(\1.float() @ \2.float()).bfloat16()", required=True,
    ),
    Replace(
        "deep-gemm-float32-reference-einsum", "speed: as deep-gemm-float32-reference-products, for the masked "
        "GEMMs' reference einsum", ("DeepGEMM@54e2261:tests/generators.py",),
        pattern=r"torch\.einsum\(('[^']*'), a, b\)", replacement=r"torch.einsum(\1, a.float(), b.float()).bfloat16()",
        required=True,
    ),
    Replace(
        "deep-gemm-mqa-lengths", "size: 128 and 512 queries over 512 and 4096 keys instead of 2048 and 8192 over "
        "8192 and 65536 in the indexer's MQA logits (8192 x 65536 logits of 64 heads are 9 TFLOP a call, and each of "
        "192 cases calls it 22 times); every length divided by 16, so the ratios the context-parallel cases need stay "
        "upstream's; heads, head dims and tolerances stay upstream's", ("DeepGEMM@54e2261:tests/test_attention.py",),
        pattern=r"for seq_len in \(2048, 8192\):(\s+)for seq_len_kv in \(8192, 65536\):",
        replacement=r"for seq_len in (128, 512):\1for seq_len_kv in (512, 4096):", required=True,
    ),
    Replace(
        "deep-gemm-paged-mqa-sizes", "size: batches of 16 and 256 instead of 256 and 4096 and mean context lengths of "
        "512 and 4096 instead of 8192 and 65536 in the paged MQA logits, with the pool of cached tokens divided by "
        "256 as well, so the same (batch, length) pairs are tested; heads, head dim, block size and tolerances stay "
        "upstream's", ("DeepGEMM@54e2261:tests/test_attention.py",),
        pattern=r"(max_kv_pool_tokens = )32 \* 1024 \* 1024((?:.*\n)*?.*)for batch_size in \(256, 4096\):"
        r"((?:.*\n)*?.*)for avg_kv in \(8192, 65536\):",
        replacement=r"\g<1>128 * 1024\2for batch_size in (16, 256):\3for avg_kv in (512, 4096):", required=True,
    ),
    Replace(
        "deep-ep-internode-tokens", "size: 512 tokens per rank instead of 4096 on 16 ranks (the hidden size, experts "
        "and top-k stay upstream's)", ("DeepEP@77bb07a:tests/test_internode.py",),
        pattern=r"num_tokens, hidden, num_topk_groups, num_topk, num_experts = 4096,",
        replacement="num_tokens, hidden, num_topk_groups, num_topk, num_experts = 512,", required=True,
    ),
    Replace(
        "deep-ep-low-latency-ranks", "size: 4 ranks instead of 8: the test's own check widens every received row "
        "of every expert to float32 at once (about 3 GB a rank), so 8 ranks need more than 24 GB; the tokens, hidden "
        "size, experts and top-k stay upstream's", ("DeepEP@77bb07a:tests/test_low_latency.py",),
        pattern=r"num_processes = 8\b", replacement="num_processes = 4", required=True,
    ),
    Environment(
        "dualpipe-four-devices", "size: the examples run once for each rank count up to the number of GPUs "
        "(DualPipe: even counts); with 4 devices, on 4 and 2 ranks (DualPipeV: 4, 3, 2 and 1)",
        ("DualPipe@*",), variables=(("DSINFRA_CONFORMANCE_DEVICES", "4"),),
    ),
    # -- results --------------------------------------------------------------
    Environment(
        "eplb-deepseek-plan", "results: the README prints DeepSeek's own plan; dsinfra makes it when asked "
        "(its default plan balances GPUs better, and differs)", ("EPLB@*:README.md",),
        variables=(("DSINFRA_EPLB_PLAN", "deepseek"),),
    ),
]


def applying(rules: Sequence[Rule], file: str, kind: type[Rule]) -> list:
    """The rules of ``kind`` that apply to ``file``, in order."""
    return [rule for rule in rules if isinstance(rule, kind) and rule.applies_to(file)]


def assert_lines(source: str) -> set[int]:
    """Line numbers (1-based) of every ``assert`` statement in ``source``."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assert):
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def adapt_source(source: str, file: str, rules: Sequence[Rule]) -> tuple[str, list[str]]:
    """``source`` of ``file`` with its :class:`Replace` rules applied, and the
    names of the rules that changed it. Raises :class:`RuleError` if a rule
    would touch an assertion, or a required rule does not match."""
    applied = []
    for rule in applying(rules, file, Replace):
        guarded = assert_lines(source)
        matches = list(re.finditer(rule.pattern, source))
        for match in matches:
            first = source.count("\n", 0, match.start()) + 1
            last = first + match.group(0).count("\n")
            if guarded & set(range(first, last + 1)):
                raise RuleError(f"rule {rule.name} would change an assertion: {file}, line {first}")
        if not matches:
            if rule.required:
                raise RuleError(f"rule {rule.name} no longer matches {file}: {rule.pattern!r}")
            continue
        source = re.sub(rule.pattern, rule.replacement, source)
        applied.append(rule.name)
    return source, applied


def prelude(file: str, rules: Sequence[Rule]) -> tuple[str, list[str]]:
    """The code to run before ``file``'s own (its :class:`Patch` rules), and their names."""
    patches = applying(rules, file, Patch)
    if not patches:
        return "", []
    stand_ins = {target: stand_in for rule in patches for target, stand_in in rule.stand_ins}
    code = f"import dsinfra.conformance.standins\ndsinfra.conformance.standins.patch({stand_ins!r})\n"
    return code, [rule.name for rule in patches]


def insert_prelude(source: str, code: str) -> str:
    """``source`` with ``code`` inserted after its docstring and ``from __future__`` imports."""
    if not code:
        return source
    after = 0
    for node in ast.parse(source).body:
        is_docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        if not (is_docstring and after == 0) and not (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
            break
        after = node.end_lineno
    lines = source.splitlines(keepends=True)
    return "".join(lines[:after]) + code + "".join(lines[after:])


def environment(file: str, rules: Sequence[Rule]) -> tuple[dict[str, str], list[str]]:
    """The variables ``file``'s :class:`Environment` rules set, and their names."""
    chosen = applying(rules, file, Environment)
    return {key: value for rule in chosen for key, value in rule.variables}, [rule.name for rule in chosen]
