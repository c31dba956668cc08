"""Tests of mbe_helpers.models: each model says in one sentence which inputs it takes, and
make_model builds every kind."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mbe_helpers.errors import MBEInputError
from mbe_helpers.models import (MLP, MODELS, ResidualMLP, SmallCNN, ViTMini, make_activation,
                                make_model)


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


# ------------------------------------------------------------------ make_model, the one factory
DIGITS = SimpleNamespace(in_dim=64, n_classes=10, image_shape=(1, 8, 8), name="digits")
VECTORS = SimpleNamespace(in_dim=40, n_classes=10, image_shape=None, name="mnist1d")
KINDS = {"mlp": MLP, "resmlp": ResidualMLP, "cnn": SmallCNN, "vit": ViTMini}


def test_every_kind_has_a_test():
    assert set(KINDS) == set(MODELS)


@pytest.mark.parametrize("kind", MODELS)
def test_make_model_builds_each_kind_for_the_data(kind):
    torch.manual_seed(0)
    model = make_model(kind, DIGITS, width=8, depth=2)
    assert type(model) is KINDS[kind]
    assert model(torch.randn(3, 64)).shape == (3, 10)


def test_make_model_sets_width_and_depth_as_documented():
    mlp = make_model("mlp", DIGITS, width=8, depth=3)
    assert [m.out_features for m in mlp.net if isinstance(m, torch.nn.Linear)] == [8, 8, 8, 10]
    resmlp = make_model("resmlp", DIGITS, width=8, depth=3)
    assert resmlp.num_blocks == 3 and resmlp.embed.out_features == 8
    cnn = make_model("cnn", DIGITS, width=8, depth=1)
    assert (cnn.features[0].out_channels, cnn.features[3].out_channels) == (4, 8)
    vit = make_model("vit", DIGITS, width=8, depth=3)
    assert len(vit.blocks) == 3 and vit.patch_embed.kernel_size == (4, 4)
    assert vit.blocks[0].attn.num_heads == 4


def test_make_model_picks_patches_and_heads_that_fit():
    small = SimpleNamespace(in_dim=36, n_classes=3, image_shape=(1, 6, 6), name="six")
    vit = make_model("vit", small, width=6, depth=1)
    assert vit.patch_embed.kernel_size == (2, 2)            # 6 is not a multiple of 4
    assert vit.blocks[0].attn.num_heads == 1                # 6 is not a multiple of 4
    assert vit(torch.randn(2, 36)).shape == (2, 3)


def test_make_model_passes_activation_and_dropout_to_the_flat_models():
    mlp = make_model("mlp", DIGITS, width=8, depth=1, activation="relu", dropout=0.5)
    assert any(isinstance(m, torch.nn.ReLU) for m in mlp.net)
    assert any(isinstance(m, torch.nn.Dropout) for m in mlp.net)
    resmlp = make_model("resmlp", DIGITS, width=8, depth=1, activation="tanh")
    assert isinstance(resmlp.blocks[0].act, torch.nn.Tanh)
    assert isinstance(make_model("resmlp", DIGITS, width=8, depth=1).blocks[0].act, torch.nn.GELU)


def test_make_model_takes_a_loaded_dataset():
    from mbe_helpers.data import load_dataset

    data = load_dataset("digits", n_train=50)
    for kind in MODELS:
        model = make_model(kind, data, width=8, depth=1)
        assert model(data.x_val[:4]).shape == (4, data.n_classes)


def test_make_model_refuses_in_one_sentence():
    with pytest.raises(MBEInputError, match="unknown model 'transformer'; choose one of mlp, "
                                            "resmlp, cnn, vit"):
        make_model("transformer", DIGITS, width=8, depth=1)
    for kind in ("cnn", "vit"):
        with pytest.raises(MBEInputError, match=f"model '{kind}' needs an image dataset, and "
                                                "mnist1d has none"):
            make_model(kind, VECTORS, width=8, depth=1)
    assert make_model("mlp", VECTORS, width=8, depth=1)(torch.randn(2, 40)).shape == (2, 10)
