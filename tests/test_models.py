"""Tests of mbe_helpers.models: each model says in one sentence which inputs it takes."""

from __future__ import annotations

import pytest
import torch

from mbe_helpers.errors import MBEInputError
from mbe_helpers.models import MLP, ResidualMLP, SmallCNN, ViTMini, make_activation


def models():
    torch.manual_seed(0)
    return [MLP(64, [8], 10), ResidualMLP(64, 8, 10, 2), SmallCNN((1, 8, 8), 10, (4, 8)),
            ViTMini((1, 8, 8), 10, patch=4, width=8, n_blocks=1)]


@pytest.mark.parametrize("model", models(), ids=lambda m: type(m).__name__)
def test_models_take_flat_and_image_inputs_and_refuse_others_in_one_sentence(model):
    x = torch.randn(5, 64)
    assert model(x).shape == (5, 10)
    if isinstance(model, (SmallCNN, ViTMini, MLP)):
        assert model(x.view(5, 1, 8, 8)).shape == (5, 10)
    name = type(model).__name__
    with pytest.raises(MBEInputError, match=f"{name} takes .*, got samples of shape \\(10,\\)"):
        model(torch.randn(5, 10))
    with pytest.raises(MBEInputError, match=f"{name} has torch.float32 weights but got "
                                            "torch.float64 inputs; convert them with x.to"):
        model(x.double())
    with pytest.raises(MBEInputError, match="got torch.int64 inputs"):
        model(x.long())
    with pytest.raises(MBEInputError, match="which has no batch dimension"):
        model(torch.randn(64))


def test_image_models_check_the_image_shape():
    cnn, vit = models()[2:]
    assert cnn(torch.randn(2, 1, 16, 16)).shape == (2, 10)  # pooled: any height and width
    with pytest.raises(MBEInputError, match=r"SmallCNN takes images of shape \(1, 8, 8\) or 64 "
                                            r"flat features per sample, got samples of shape "
                                            r"\(3, 8, 8\)"):
        cnn(torch.randn(2, 3, 8, 8))
    with pytest.raises(MBEInputError, match=r"ViTMini takes images of shape \(1, 8, 8\)"):
        vit(torch.randn(2, 1, 16, 16))


def test_bad_model_arguments_are_one_sentence():
    with pytest.raises(MBEInputError, match="unknown activation 'swish'; choose one of tanh"):
        make_activation("swish")
    with pytest.raises(MBEInputError, match="image size 8x8 is not divisible by patch size 3"):
        ViTMini((1, 8, 8), 10, patch=3)
