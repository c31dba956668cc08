"""Learning rules: hand-computed updates and what each variant promises."""

import torch
import torch.nn.functional as F
import pytest

from mbe_helpers import feedback
from mbe_helpers.errors import MBEInputError
from mbe_helpers.models import MLP, ResidualMLP


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return MLP(3, [4], 2, activation="tanh").double()


def batch(n=5, d=3, c=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, c, (n,), generator=g)


def test_backprop_is_autograd():
    model, (x, y) = tiny_mlp(), batch()
    loss = feedback.Backprop().grads(model, x, y)
    assert torch.isclose(loss, F.cross_entropy(model(x), y))
    w1 = model.net[0].weight
    manual = torch.autograd.grad(F.cross_entropy(model(x), y), w1)[0]
    assert torch.allclose(grads_of(model)["net.0.weight"], manual)


def test_fa_with_b_equal_w_is_backprop_and_hand_computed_otherwise():
    model, (x, y) = tiny_mlp(), batch()
    rule = feedback.FeedbackAlignment(seed=0)
    rule._ensure(model)
    rule.matrices = {k: dict(model.named_modules())[k].weight.detach().clone() for k in rule.matrices}
    rule.grads(model, x, y)
    fa = grads_of(model)
    model.zero_grad()
    feedback.Backprop().grads(model, x, y)
    for name, g in grads_of(model).items():
        assert torch.allclose(fa[name], g)
    # a random B: dW1 = ((e/N) B2 * (1 - h^2))^T x
    model.zero_grad()
    rule = feedback.FeedbackAlignment(seed=3)
    rule.grads(model, x, y)
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    h = torch.tanh(x @ w1.T + b1)
    e = (torch.softmax(h @ w2.T + b2, -1) - F.one_hot(y, 2)) / len(y)
    delta = (e @ rule.matrices["net.2"]) * (1 - h ** 2)
    assert torch.allclose(model.net[0].weight.grad, delta.T @ x)
    assert torch.allclose(model.net[2].weight.grad, e.T @ h)      # last layer: true gradient
    assert type(model.net[0]).forward is model.net[0].forward.__func__   # patch removed


def test_dfa_update_matches_hand_computation_on_mlp():
    model, (x, y) = tiny_mlp(), batch()
    rule = feedback.DirectFeedbackAlignment(seed=4)
    rule.grads(model, x, y)
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    h = torch.tanh(x @ w1.T + b1)
    e = (torch.softmax(h @ w2.T + b2, -1) - F.one_hot(y, 2)) / len(y)
    (b,) = rule.matrices
    assert b.shape == (4, 2)
    delta = (e @ b.T) * (1 - h ** 2)
    assert torch.allclose(model.net[0].weight.grad, delta.T @ x)
    assert torch.allclose(model.net[0].bias.grad, delta.sum(0))
    assert torch.allclose(model.net[2].weight.grad, e.T @ h)


def test_dfa_on_residual_mlp_sends_error_to_every_block():
    torch.manual_seed(0)
    model = ResidualMLP(3, 6, 2, 2).double()
    x, y = batch()
    rule = feedback.DirectFeedbackAlignment(seed=1)
    rule.grads(model, x, y)
    assert len(rule.matrices) == 3                                  # h_0 and both branches
    # block 1's second linear: dW = delta^T act, delta = e B_2^T / N at the branch output
    hidden, logits = [], None
    h = model.embed(x)
    for blk in model.blocks:
        hidden.append(h)
        h = h + blk(h)
    logits = model.out_head(model.out_ln(h))
    e = (torch.softmax(logits, -1) - F.one_hot(y, 2)) / len(y)
    blk = model.blocks[1]
    act = blk.act(blk.fc1(blk.ln(hidden[1])))
    assert torch.allclose(blk.fc2.weight.grad, (e @ rule.matrices[2].T).T @ act.detach())
    signals = rule.signals(logits, y)
    assert torch.allclose(signals[2] / len(y), e @ rule.matrices[2].T)


def test_penalty_adds_exactly_its_gradient():
    torch.manual_seed(0)
    model, (x, y) = ResidualMLP(3, 6, 2, 2).double(), batch()
    vanilla = feedback.DirectFeedbackAlignment(seed=2)
    vanilla.grads(model, x, y)
    g0 = grads_of(model)
    model.zero_grad()
    feedback.DirectFeedbackAlignment(seed=2, penalty=0.5).grads(model, x, y)
    g1 = grads_of(model)
    h, pen = model.embed(x).detach(), 0
    for blk in model.blocks:
        f = blk(h)
        pen = pen + 0.5 * f.pow(2).sum(-1).mean()
        h = h + f.detach()
    params = dict(model.named_parameters())
    expected = torch.autograd.grad(pen, [params[n] for n in g0 if n.startswith("blocks")])
    for n, e in zip([n for n in g0 if n.startswith("blocks")], expected):
        assert torch.allclose(g1[n] - g0[n], e)
    assert torch.allclose(g1["out_head.weight"], g0["out_head.weight"])


def test_shuffled_feedback_is_redrawn_and_vanilla_is_fixed():
    model, (x, y) = tiny_mlp(), batch()
    fixed, shuffled = feedback.make_rule("dfa", seed=0), feedback.make_rule("dfa_shuffled", seed=0)
    fixed.grads(model, x, y); first = fixed.matrices[0].clone(); fixed.grads(model, x, y)
    assert torch.equal(first, fixed.matrices[0])
    shuffled.grads(model, x, y); first = shuffled.matrices[0].clone(); shuffled.grads(model, x, y)
    assert not torch.equal(first, shuffled.matrices[0])


def test_frozen_blocks_stay_at_init():
    torch.manual_seed(0)
    model, (x, y) = ResidualMLP(3, 6, 2, 2).double(), batch()
    before = {n: p.clone() for n, p in model.named_parameters()}
    rule = feedback.make_rule("frozen")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad(); rule.grads(model, x, y); opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == n.startswith("blocks"), n


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    torch.manual_seed(0)
    model, (x, y) = ResidualMLP(3, 6, 2, 2).double(), batch()
    rule = feedback.make_rule("dfa_penalized", seed=7, penalty=0.01)
    rule.grads(model, x, y)
    feedback.save_checkpoint(tmp_path / "c.pt", model, rule, epochs=3, dataset="digits")
    fresh = ResidualMLP(3, 6, 2, 2).double()
    loaded, rule2, meta = feedback.load_checkpoint(tmp_path / "c.pt", fresh)
    assert meta == {"epochs": 3, "dataset": "digits"} and rule2.penalty == 0.01
    assert all(torch.equal(a, b) for a, b in zip(rule.matrices, rule2.matrices))
    assert torch.equal(loaded(x), model(x))


def test_unknown_rule_and_model():
    with pytest.raises(MBEInputError, match="unknown learning rule 'sgd'; choose one of bp, fa"):
        feedback.make_rule("sgd")
    with pytest.raises(MBEInputError, match="ResidualMLP, ViTMini and MLP"):
        feedback.make_rule("dfa").grads(torch.nn.Linear(3, 2), *batch())


def test_dfa_on_vit_gives_every_token_the_projected_error():
    from mbe_helpers.models import ViTMini

    torch.manual_seed(0)
    model = ViTMini((1, 4, 4), 3, patch=2, width=8, n_blocks=2, n_heads=2).double()
    x = torch.randn(5, 16, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    rule = feedback.DirectFeedbackAlignment(seed=2)
    rule.grads(model, x, y)
    assert len(rule.matrices) == 3 and all(b.shape == (8, 3) for b in rule.matrices)
    # the last block's MLP output layer: dW = sum over samples and tokens of delta^T act,
    # with delta = e B_2^T / N at every token
    h = model.tokens(x)
    h1 = h + model.blocks[0](h)
    blk = model.blocks[1]
    a = blk.ln1(h1)
    mid = h1 + blk.attn(a, a, a, need_weights=False)[0]
    act = blk.mlp[1](blk.mlp[0](blk.ln2(mid)))
    h2 = h1 + blk(h1)
    logits = model.head(model.norm(h2)[:, 0])
    e = (torch.softmax(logits, -1) - F.one_hot(y, 3)) / len(y)
    delta = (e @ rule.matrices[2].T)[:, None, :].expand(-1, act.shape[1], -1)
    expected = torch.einsum("ntd,nth->dh", delta, act.detach())
    assert torch.allclose(blk.mlp[2].weight.grad, expected)
    # the head and the final norm learn from their own, true, local gradient
    local = torch.autograd.grad(F.cross_entropy(model.head(model.norm(h2.detach())[:, 0]), y),
                                model.head.weight)[0]
    assert torch.allclose(model.head.weight.grad, local)


class NotATensor:
    """Anything a weights-only load must refuse."""


def test_bad_checkpoints_are_one_sentence_and_never_suggest_the_unsafe_load(tmp_path):
    model = ResidualMLP(3, 6, 2, 2)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(MBEInputError, match="is not a checkpoint of save_checkpoint .* "
                                            r"model.load_state_dict\(torch.load"):
        feedback.load_checkpoint(tmp_path / "plain.pt", model)
    torch.save({"model": model.state_dict(), "rule": {"name": "bp"},
                "meta": {"x": NotATensor()}}, tmp_path / "evil.pt")
    with pytest.raises(MBEInputError) as refused:
        feedback.load_checkpoint(tmp_path / "evil.pt", model)
    assert "was refused because it holds objects other than tensors" in str(refused.value)
    assert "weights_only" not in str(refused.value) and refused.value.__suppress_context__
    with pytest.raises(MBEInputError, match="does not exist"):
        feedback.load_checkpoint(tmp_path / "none.pt", model)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(MBEInputError, match="could not be read as a torch file"):
        feedback.load_checkpoint(tmp_path / "text.pt", model)
    feedback.save_checkpoint(tmp_path / "c.pt", model, feedback.make_rule("bp"))
    with pytest.raises(MBEInputError, match=r"do not fit this ResidualMLP \(6 missing, e.g. "
                                            "'blocks.2.ln.weight'\\); build the model"):
        feedback.load_checkpoint(tmp_path / "c.pt", ResidualMLP(3, 6, 2, 3))
