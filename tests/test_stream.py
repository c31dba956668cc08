"""Tests of mbe_helpers.stream: the residual-stream contract read off ResidualMLP, ViTMini and
user models, and one sentence for a model that breaks it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mbe_helpers import stream
from mbe_helpers.errors import MBEInputError
from mbe_helpers.models import MLP, ResidualMLP, ViTMini

pytestmark = pytest.mark.usefixtures("one_thread")


def resmlp():
    torch.manual_seed(0)
    return ResidualMLP(6, 8, 3, n_blocks=3).double().eval()


def vit():
    torch.manual_seed(0)
    return ViTMini((1, 8, 8), 3, patch=4, width=8, n_blocks=2, n_heads=2).double().eval()


def batch(model, n=5):
    torch.manual_seed(1)
    width = 6 if isinstance(model, ResidualMLP) else 64
    return torch.randn(n, width, dtype=torch.float64), torch.arange(n) % 3


MAKERS = [resmlp, vit]
IDS = ["ResidualMLP", "ViTMini"]


class FlatStream(nn.Module):
    """A user model that is not from mbe_helpers.models but has the contract's names."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 6)) for _ in range(2))
        self.out_ln = nn.LayerNorm(6)
        self.out_head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out_head(self.out_ln(h))


class NoHead(nn.Module):
    """Embedding and blocks, but no terminal stack."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.blocks = nn.ModuleList([nn.Linear(6, 6)])
        self.out_ln = nn.LayerNorm(6)          # half a stack: out_head is missing


# ------------------------------------------------------------------ the contract
@pytest.mark.parametrize("make", MAKERS, ids=IDS)
def test_models_of_the_package_meet_the_contract(make):
    assert stream.check_contract(make()) is None


def test_a_user_model_with_the_contract_names_is_read_like_the_package_models():
    torch.manual_seed(0)
    model = FlatStream()
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    hidden, logits = stream.forward_stream(model, x)
    assert len(hidden) == 3 and torch.allclose(logits, model(x))
    _, grads, _ = stream.stream_gradients(model, x, y)
    assert [tuple(g.shape) for g in grads] == [(5, 6)] * 3


def test_a_model_that_breaks_the_contract_gets_one_sentence_naming_what_it_lacks():
    with pytest.raises(MBEInputError) as info:
        stream.check_contract(NoHead())
    message = str(info.value)
    assert message == ("NoHead is not a residual model: it lacks a terminal stack "
                       "(`out_ln` + `out_head`, or `norm` + `head`)")
    assert "\n" not in message


def test_every_missing_part_is_named_in_the_same_sentence():
    with pytest.raises(MBEInputError, match=r"^MLP is not a residual model: it lacks an embedding "
                                            r".*; `blocks` .*; a terminal stack"):
        stream.check_contract(MLP(4, [8], 3))


@pytest.mark.parametrize("call", [
    lambda m: stream.forward_stream(m, torch.randn(2, 4)),
    lambda m: stream.stream_gradients(m, torch.randn(2, 4), torch.tensor([0, 1])),
    lambda m: stream.tail_loss(m, 0, torch.tensor([0, 1])),
], ids=["forward_stream", "stream_gradients", "tail_loss"])
def test_the_readers_refuse_a_broken_model_before_computing(call):
    with pytest.raises(MBEInputError, match="NoHead is not a residual model"):
        call(NoHead())


# ------------------------------------------------------------------ forward_stream
@pytest.mark.parametrize("make", MAKERS, ids=IDS)
def test_forward_stream_is_the_models_own_forward_pass(make):
    model = make()
    x, _ = batch(model)
    hidden, logits = stream.forward_stream(model, x)
    own_logits, own_hidden = model(x, return_hidden=True)
    assert len(hidden) == len(model.blocks) + 1
    assert torch.allclose(logits, own_logits)
    assert all(torch.allclose(a, b) for a, b in zip(hidden, own_hidden))
    assert torch.allclose(hidden[0], stream.embed(model, x))
    assert torch.allclose(logits, stream.readout(model, hidden[-1]))


def test_token_models_keep_every_position_and_read_the_cls_token():
    model = vit()
    x, _ = batch(model)
    hidden, logits = stream.forward_stream(model, x)
    assert tuple(hidden[0].shape) == (5, 5, 8)              # CLS + 4 patches
    changed = hidden[-1].clone()
    changed[:, 1:] += 10.0                                   # patches do not reach the head
    assert torch.allclose(stream.readout(model, changed), logits)


def test_embed_flattens_image_shaped_inputs_of_a_flat_model():
    torch.manual_seed(0)
    model = ResidualMLP(64, 8, 3, n_blocks=1)
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(stream.embed(model, x), model.embed(x.flatten(1)))


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("make", MAKERS, ids=IDS)
def test_stream_gradients_are_the_gradients_of_the_batch_mean_loss(make):
    model = make()
    x, y = batch(model)
    hidden, grads, logits = stream.stream_gradients(model, x, y)
    assert all(not t.requires_grad for t in (*hidden, *grads, logits))
    assert all(p.grad is None for p in model.parameters())       # no parameter gradient formed
    for layer, (h, g) in enumerate(zip(hidden, grads)):
        state = h.clone().requires_grad_(True)
        loss = stream.tail_loss(model, layer, y)(state).mean()
        (expected,) = torch.autograd.grad(loss, state)
        assert torch.allclose(g, expected, atol=1e-12), layer


def test_stream_gradients_agree_with_finite_differences():
    model = resmlp()
    x, y = batch(model)
    hidden, grads, _ = stream.stream_gradients(model, x, y)
    loss_fn = stream.tail_loss(model, 1, y)
    step = torch.zeros_like(hidden[1])
    step[2, 3] = 1e-6
    with torch.no_grad():
        numeric = (loss_fn(hidden[1] + step).mean() - loss_fn(hidden[1] - step).mean()) / 2e-6
    assert float(numeric) == pytest.approx(float(grads[1][2, 3]), rel=1e-6)


def test_the_output_error_is_softmax_minus_onehot():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    e = stream.output_error(logits, torch.tensor([1, 0]))
    p = 1 / (1 + torch.exp(torch.tensor(-2.0, dtype=torch.float64)))
    assert e.dtype == torch.float64
    assert torch.allclose(e, torch.stack([torch.tensor([0.5, -0.5], dtype=torch.float64),
                                          torch.stack([p - 1, 1 - p])]))
    assert torch.allclose(e.sum(dim=1), torch.zeros(2, dtype=torch.float64))


def test_the_output_error_is_the_gradient_of_the_summed_cross_entropy():
    model = resmlp()
    x, y = batch(model)
    logits = model(x).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), logits)
    assert torch.allclose(stream.output_error(logits.detach(), y), grad)


# ------------------------------------------------------------------ tail_loss
@pytest.mark.parametrize("make", MAKERS, ids=IDS)
def test_tail_loss_gives_per_sample_losses_for_any_leading_dimensions(make):
    model = make()
    x, y = batch(model)
    hidden, logits = stream.forward_stream(model, x)
    per_sample = F.cross_entropy(logits, y, reduction="none")
    for layer in range(len(hidden)):
        fn = stream.tail_loss(model, layer, y)
        assert torch.allclose(fn(hidden[layer]), per_sample)
        stacked = torch.stack([hidden[layer]] * 3).unsqueeze(0)      # (1, 3, N, *state)
        out = fn(stacked)
        assert out.shape == (1, 3, len(y))
        assert torch.allclose(out[0, 2], per_sample)


@pytest.mark.parametrize("layer", [-1, 4])
def test_tail_loss_refuses_a_state_the_model_does_not_have(layer):
    with pytest.raises(MBEInputError, match=f"layer must be between 0 and 3, got {layer}"):
        stream.tail_loss(resmlp(), layer, torch.tensor([0]))


def test_a_flat_model_with_norm_and_head_is_read_per_sample():
    class FlatNormHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.blocks = nn.Linear(4, 6), nn.ModuleList([nn.Linear(6, 6)])
            self.norm, self.head = nn.LayerNorm(6), nn.Linear(6, 3)

    _, logits = stream.forward_stream(FlatNormHead(), torch.randn(5, 4))
    assert logits.shape == (5, 3)
