import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dsinfra.models import IGNORE, Experts, Gate, ModelArgs, SortTask, Transformer

TINY = ModelArgs(dim=64, n_layers=3, n_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                 v_head_dim=16, inter_dim=96, moe_inter_dim=32, n_routed_experts=8, n_expert_groups=4,
                 n_limited_groups=2, n_activated_experts=3, max_seq_len=64)


def test_gate_limits_groups_and_normalises():
    gate = Gate(TINY)
    gate.bias.normal_()  # the bias steers the choice, not the weights
    x = torch.randn(50, TINY.dim)
    weights, indices = gate(x)
    assert indices.shape == (50, 3) and weights.shape == (50, 3)
    groups = indices // (TINY.n_routed_experts // TINY.n_expert_groups)
    assert all(len(set(row)) <= TINY.n_limited_groups for row in groups.tolist())
    torch.testing.assert_close(weights.sum(-1), torch.full((50,), TINY.route_scale))
    scores = torch.sigmoid(x @ gate.weight.t())
    torch.testing.assert_close(weights, scores.gather(1, indices) / scores.gather(1, indices).sum(-1, keepdim=True))


def test_bias_update_moves_towards_balance():
    gate = Gate(TINY)
    gate.update_bias(torch.tensor([10.0, 0, 0, 0, 0, 0, 0, 6]))
    assert gate.bias[0] < 0 and gate.bias[1] > 0 and gate.bias[7] < 0


def test_experts_match_a_per_token_loop():
    experts = Experts(6, 16, 8)
    x = torch.randn(20, 16)
    idx = torch.randint(-1, 6, (20, 3))
    w = torch.rand(20, 3)
    expected = torch.stack([
        sum((w[t, k] * experts.experts[int(idx[t, k])](x[t]) for k in range(3) if idx[t, k] >= 0), torch.zeros(16))
        for t in range(20)
    ])
    torch.testing.assert_close(experts(x, idx, w), expected)


def test_forward_is_causal_and_trains():
    model = Transformer(TINY, seed=1)
    tokens = torch.randint(0, TINY.vocab_size, (2, 12))
    logits = model(tokens)
    assert logits.shape == (2, 12, TINY.vocab_size)
    changed = tokens.clone()
    changed[:, 8] = (changed[:, 8] + 1) % TINY.vocab_size
    torch.testing.assert_close(model(changed)[:, :8], logits[:, :8])  # the past does not see the future
    task = SortTask(TINY.vocab_size, 4, 16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        tokens, targets = task.batch(step % 4)
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_same_seed_same_model():
    a, b = Transformer(TINY, seed=3), Transformer(TINY, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_sort_task():
    task = SortTask(10, 5, 3, seed=2)
    tokens, targets = task.batch(0)
    assert tokens.shape == (3, 11) and torch.equal(tokens, task.batch(0)[0])
    assert (tokens[:, 5] == 9).all()
    assert torch.equal(tokens[:, 6:], tokens[:, :5].sort(1).values)
    assert (targets[:, :5] == IGNORE).all() and (targets[:, -1] == IGNORE).all()
    assert torch.equal(targets[:, 5:10], tokens[:, 6:])
    requests = task.requests([0, 3])
    assert [len(p) for p, _ in requests] == [6, 9] and [len(c) for _, c in requests] == [5, 2]
    prompt, continuation = requests[1]
    assert prompt[5] == 9 and torch.equal(torch.cat([prompt[6:], continuation]), prompt[:5].sort().values)
    with pytest.raises(ValueError, match="answered"):
        task.requests([5])


@pytest.mark.parametrize("field, value", [("n_layers", 0), ("n_limited_groups", 5), ("n_activated_experts", 7), ("n_dense_layers", 4)])
def test_bad_sizes(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **{field: value})
