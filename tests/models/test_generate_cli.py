"""python -m dsinfra generate: token ids or text in, the same ids on one rank
and on two (experts spread by deep_ep and placed by EPLB), --json out."""

import json

import pytest

from dsinfra import cli
from dsinfra.models import load_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["130,246,251,146,28,179,209,82,134,100,183,87,105", "182,95,47,11,154,255,51,109,167", "106,147,231,100,114"]


def _generate(path, tmp_path, *options):
    out = tmp_path / "out.json"
    argv = ["generate", "--model", str(path), "--max-new-tokens", "5", "--json", str(out), *options]
    for prompt in PROMPTS:
        argv += ["--prompt-ids", prompt]
    assert cli.main(argv) == 0
    return json.loads(out.read_text())["outputs"]


def test_one_rank_writes_what_the_model_generates(checkpoint, tmp_path, capsys):
    path = checkpoint("v32")
    outputs = _generate(path, tmp_path)
    prompts = [[int(t) for t in p.split(",")] for p in PROMPTS]
    assert outputs == load_pretrained(path).generate(prompts, 5)
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"[{i}] " + " ".join(map(str, ids)) for i, ids in enumerate(outputs)]


def test_two_ranks_give_the_same_ids(checkpoint, tmp_path):
    path = checkpoint("v3-bf16")  # bf16: decoding through deep_ep's low-latency mode
    assert _generate(path, tmp_path, "--ranks", "2") == _generate(path, tmp_path)


def test_text_prompts_through_the_checkpoints_tokenizer(checkpoint, tmp_path, capsys):
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    path = shutil.copytree(checkpoint("v3"), tmp_path / "with-tokenizer")
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w2"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path / "tokenizer.json"))
    assert cli.main(["generate", "--model", str(path), "--prompt", "w106 w147 w231", "--max-new-tokens", "4"]) == 0
    text = capsys.readouterr().out
    ids = load_pretrained(path).generate([[106, 147, 231]], 4)[0]
    assert text == "[0] " + " ".join(f"w{i}" for i in ids) + "\n"


def test_bad_arguments_are_refused(checkpoint, capsys):
    path = str(checkpoint("v3"))
    for argv, message in [
        ([], "give prompts either with --prompt-ids or with --prompt"),
        (["--prompt-ids", "1,x"], "--prompt-ids must be comma-separated integers"),
        (["--prompt-ids", "1,999"], "token id 999 is outside the model's vocabulary [0, 256)"),
        (["--prompt", "hello"], "--prompt needs"),
        (["--prompt-ids", "1", "--ranks", "3"], "the 8 routed experts do not split evenly over 3 ranks"),
        (["--prompt-ids", "1", "--ranks", "2", "--redundant-experts", "3"], "--redundant-experts must be a multiple of the ranks (2)"),
    ]:
        assert cli.main(["generate", "--model", path, *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_a_rank_without_prompts_and_fp8_experts_behind_low_latency_dispatch(checkpoint):
    """One prompt on two ranks: rank 1 serves none but holds experts (and takes
    part in every dispatch); bf16 activations with FP8 experts decode through
    the low-latency mode and DeepGEMM's masked grouped GEMM."""
    from dsinfra.models.cli import Request, generate_on_rank
    from dsinfra.testing import spawn

    request = Request(str(checkpoint("v3-fp8")), [[106, 147, 231, 100, 114, 91, 93, 204]], 4, "bfloat16", "cpu", 0)
    assert spawn(generate_on_rank, 2, request)[0] == generate_on_rank(0, 1, None, request)
