"""flash_mla_sparse_fwd (sparse prefill) on every implementation against the reference,
with FlashMLA's bounds: out cos-diff, max_logits and lse within 1e-6 or 2/65536."""

import math

import pytest
import torch

from dsinfra import flash_mla
from dsinfra.flash_mla import reference
from dsinfra.testing import calc_diff, generator, randn

from .checks import assert_same_specials
from .inputs import sink_values

INVALID = [-1, -2**31, -7]  # beside s_kv and beyond, which depend on the case


def prefill_case(*, s_q=7, s_kv=50, h_q=16, h_kv=1, d_qk=64, d_v=64, topk=24, dtype=torch.bfloat16, sink=True,
                 lengths=True, seed=0):
    """Arguments of a prefill call: invalid indices of every kind, a query with none valid,
    and NaN in every kv row that no used index position names."""
    gen = generator(seed)
    q = randn(s_q, h_q, d_qk, seed=seed + 1).to(dtype)
    kv = randn(s_kv, h_kv, d_qk, seed=seed + 2).to(dtype)
    indices = torch.randint(0, s_kv, (s_q, h_kv, topk), generator=gen, dtype=torch.int32)
    invalid = torch.tensor(INVALID + [s_kv, s_kv + 5, 2**31 - 1], dtype=torch.int32)
    pick = torch.randint(0, len(invalid), indices.shape, generator=gen)
    indices = torch.where(torch.rand(indices.shape, generator=gen) < 0.25, invalid[pick], indices)
    indices[0] = -1
    args = dict(q=q, kv=kv, indices=indices, sm_scale=d_qk ** -0.5, d_v=d_v)
    if sink:
        args["attn_sink"] = sink_values(h_q, seed=seed + 3)
    used = (indices >= 0) & (indices < s_kv)
    if lengths:
        args["topk_length"] = torch.randint(0, topk + 1, (s_q,), generator=gen, dtype=torch.int32)
        args["topk_length"][-1] = 0
        used &= torch.arange(topk) < args["topk_length"][:, None, None]
    unused = torch.ones(s_kv, h_kv, dtype=torch.bool)
    for group in range(h_kv):
        unused[indices[:, group][used[:, group]].long(), group] = False
    kv[unused] = float("nan")
    return args


def check(args):
    out, max_logits, lse = flash_mla.flash_mla_sparse_fwd(**args)
    expected = reference.flash_mla_sparse_fwd(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()})
    expected_out, expected_max, expected_lse = expected
    s_q, h_q = args["q"].shape[:2]
    assert out.shape == (s_q, h_q, args["d_v"]) and out.dtype == args["q"].dtype
    assert max_logits.shape == lse.shape == (s_q, h_q) and max_logits.dtype == lse.dtype == torch.float32
    for result, want in ((max_logits, expected_max), (lse, expected_lse)):
        assert_same_specials(result, want)
        finite = torch.isfinite(want)
        error = (result.cpu()[finite] - want[finite]).abs()
        assert ((error < 1e-6) | (error < 2.01 / 65536 * want[finite].abs())).all()
    assert not out.isnan().any() and calc_diff(out.cpu().float(), expected_out.float()) < 1e-5
    assert (out.cpu()[expected_lse == math.inf] == 0).all() and (expected_max[expected_lse == math.inf] == -math.inf).all()
    return out.cpu(), max_logits.cpu(), lse.cpu()


CASES = {
    "plain": dict(),
    "one-query-topk-1": dict(s_q=1, topk=1, sink=False, lengths=False),
    "fp16": dict(dtype=torch.float16),
    "two-kv-heads": dict(h_kv=2, h_q=32),
    "topk-not-a-multiple-of-64": dict(topk=70, s_kv=90, lengths=False),
    "deepseek-heads": dict(d_qk=576, d_v=512, h_q=64, topk=80, s_kv=200),
    "narrow-v": dict(d_qk=96, d_v=40),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_torch(monkeypatch, case):
    monkeypatch.setenv("DSINFRA_BACKEND", "torch")
    check(prefill_case(**case))


def test_torch_in_chunks(monkeypatch):
    """Queries are attended in chunks; a chunk of one query works as well as all at once."""
    monkeypatch.setenv("DSINFRA_BACKEND", "torch")
    args = prefill_case(s_q=9)
    whole = check(args)
    monkeypatch.setattr("dsinfra.flash_mla.torch_impl.PREFILL_CHUNK_BYTES", 1)
    for result, want in zip(check(args), whole):
        assert torch.equal(result.nan_to_num(), want.nan_to_num())


def test_sink_scales_out_only(monkeypatch):
    monkeypatch.setenv("DSINFRA_BACKEND", "torch")
    args = prefill_case(lengths=False)
    out, max_logits, lse = check(args)
    plain_out, plain_max, plain_lse = check(dict(args, attn_sink=None))
    assert torch.equal(max_logits, plain_max) and torch.equal(lse, plain_lse)
    seen = lse != math.inf
    assert (out[:, 0][seen[:, 0]] == 0).all(), "sink +inf: out 0"
    assert torch.equal(out[:, 1], plain_out[:, 1]), "sink -inf: no change"


def test_bad_arguments():
    args = prefill_case()
    with pytest.raises(TypeError, match="kv must have dtype bfloat16; got float16"):
        flash_mla.flash_mla_sparse_fwd(**dict(args, kv=args["kv"].half()))
    with pytest.raises(ValueError, match=r"indices must have shape \[7, 1, topk\]"):
        flash_mla.flash_mla_sparse_fwd(**dict(args, indices=args["indices"][:3]))
    with pytest.raises(ValueError, match=r"d_v must be in \[1, d_qk=64\]; got 512"):
        flash_mla.flash_mla_sparse_fwd(**dict(args, d_v=512))
    with pytest.raises(ValueError, match=r"topk_length must hold values in \[0, 25\); found -1"):
        flash_mla.flash_mla_sparse_fwd(**dict(args, topk_length=torch.full((7,), -1, dtype=torch.int32)))
    with pytest.raises(ValueError, match=r"h_q \(16, q's dimension 1\) must be a multiple of h_kv \(3"):
        flash_mla.flash_mla_sparse_fwd(**dict(args, kv=args["kv"].expand(-1, 3, -1)))
    with pytest.raises(TypeError, match="sm_scale must be a float"):
        flash_mla.flash_mla_sparse_fwd(**dict(args, sm_scale=None))


@pytest.mark.parametrize("case", ["plain", "two-kv-heads", "narrow-v"])
def test_triton(monkeypatch, kernel_device, case):
    monkeypatch.setenv("DSINFRA_BACKEND", "triton")
    args = prefill_case(**CASES[case], s_q=3)
    check({k: v.to(kernel_device) if isinstance(v, torch.Tensor) else v for k, v in args.items()})


@pytest.mark.gpu
def test_triton_gpu_deepseek_shapes(monkeypatch):
    monkeypatch.setenv("DSINFRA_BACKEND", "triton")
    for d_qk in (576, 512):
        args = prefill_case(s_q=64, s_kv=3000, h_q=128, d_qk=d_qk, d_v=512, topk=2048)
        check({k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in args.items()})
