"""Tests of mbe_helpers.spectral against numpy's SVD and norms, powerlaw.Fit and hand-computed cases."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
from scipy.linalg import block_diag

from mbe_helpers.errors import MBEInputError
from mbe_helpers.spectral import (PHENOMENOLOGY, alpha_hat, fit_power_law, layer_esds, layer_weights,
                                  matrix_spectrum, phenomenology, spectral_metrics, weight_spectra)


def erank_by_definition(w: np.ndarray) -> float:
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    s = s[s > max(w.shape) * np.finfo(w.dtype).eps * s.max()]  # numerical zeros at the weights' precision
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def pareto(n: int, alpha: float, seed: int) -> np.ndarray:
    """Continuous power law on [1, inf) with density exponent alpha (inverse-CDF sampling)."""
    return (1 - np.random.default_rng(seed).random(n)) ** (-1 / (alpha - 1))


def powerlaw_fit(values, **kwargs):
    powerlaw = pytest.importorskip("powerlaw")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return powerlaw.Fit(values, verbose=False, **kwargs)


# --------------------------------------------------------------------------- #
# One matrix                                                                  #
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("shape", [(7, 7), (5, 12), (12, 5), (40, 3)])
def test_matrix_quantities_equal_numpy(shape):
    w = np.random.default_rng(0).normal(size=shape)
    got = matrix_spectrum(w)
    s = np.linalg.svd(w, compute_uv=False)
    big, small = max(shape), min(shape)
    assert got["erank"] == pytest.approx(erank_by_definition(w), rel=1e-12)
    assert got["sci"] == pytest.approx(erank_by_definition(w) / small, rel=1e-12)
    assert got["stable_rank"] == pytest.approx(np.linalg.norm(w, "fro") ** 2 / np.linalg.norm(w, 2) ** 2,
                                               rel=1e-12)
    assert got["nuclear_norm"] == pytest.approx(np.linalg.norm(w, "nuc"), rel=1e-12)
    assert got["spectral_norm"] == pytest.approx(np.linalg.norm(w, 2), rel=1e-12)
    assert got["frobenius_norm"] == pytest.approx(np.linalg.norm(w, "fro"), rel=1e-12)
    assert got["lambda_max"] == pytest.approx(np.linalg.eigvalsh(w.T @ w if shape[0] >= shape[1] else w @ w.T)
                                              .max() / big, rel=1e-12)
    assert got["q"] == big / small and got["rank_max"] == small and got["n_eigs"] == small
    assert got["reason"] == "" or got["n_eigs"] < 10


def test_hand_computed_matrices():
    eye = matrix_spectrum(np.eye(12))
    assert eye["erank"] == pytest.approx(12) and eye["sci"] == pytest.approx(1)
    assert eye["stable_rank"] == pytest.approx(12) and eye["nuclear_norm"] == pytest.approx(12)
    assert eye["spectral_norm"] == pytest.approx(1) and eye["lambda_max"] == pytest.approx(1 / 12)
    assert math.isnan(eye["alpha"]) and "repeated" in eye["reason"]  # a flat spectrum has no tail

    half = matrix_spectrum(np.diag([3.0, 3.0, 0.0, 0.0]))  # exact zeros are not counted
    assert half["erank"] == pytest.approx(2) and half["sci"] == pytest.approx(0.5)
    assert half["stable_rank"] == pytest.approx(2) and half["n_eigs"] == 2

    rank_one = matrix_spectrum(np.outer(np.arange(1.0, 6.0), np.ones(8)).astype(np.float32))
    assert rank_one["erank"] == pytest.approx(1) and rank_one["stable_rank"] == pytest.approx(1, rel=1e-6)
    assert rank_one["n_eigs"] == 1 and math.isnan(rank_one["alpha"]) and "fewer than" in rank_one["reason"]


def test_degenerate_matrices_give_nan_with_reason():
    zero = matrix_spectrum(np.zeros((6, 4)))
    assert math.isnan(zero["erank"]) and math.isnan(zero["sci"]) and math.isnan(zero["stable_rank"])
    assert zero["spectral_norm"] == 0 and zero["nuclear_norm"] == 0 and zero["reason"] == "all-zero matrix"
    bad = np.ones((6, 4))
    bad[0, 0] = np.inf
    broken = matrix_spectrum(bad)
    assert math.isnan(broken["erank"]) and math.isnan(broken["alpha"]) and broken["reason"] == "non-finite weights"
    with pytest.raises(MBEInputError, match="non-empty"):
        matrix_spectrum(np.ones(5))


# --------------------------------------------------------------------------- #
# Power-law fit                                                               #
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_equals_powerlaw_package_on_a_power_law(seed):
    """Default powerlaw.Fit settings; min_tail=3 gives its candidate set (it skips the two largest values)."""
    values = pareto(400, 2.5, seed)
    ours = fit_power_law(values, min_tail=3)
    ref = powerlaw_fit(values)
    assert ours.x_min == ref.xmin and ours.n_tail == ref.n_tail
    assert ours.alpha == pytest.approx(ref.alpha, rel=1e-10)
    assert ours.ks_distance == pytest.approx(ref.power_law.D, rel=1e-8)
    assert abs(ours.alpha - 2.5) < 4 * ours.alpha_stderr


def test_fit_equals_powerlaw_package_on_network_esds():
    """Random-network ESDs have light tails (alpha > 3): compare with powerlaw's alpha range opened to (1, inf)."""
    rng = np.random.default_rng(3)
    for shape in [(300, 120), (64, 200)]:
        eigs = np.linalg.svd(rng.normal(size=shape), compute_uv=False) ** 2 / max(shape)
        ours = fit_power_law(eigs, min_tail=3)
        ref = powerlaw_fit(eigs, parameter_ranges={"alpha": [1, None]})
        assert ours.x_min == ref.xmin and ours.n_tail == ref.n_tail
        assert ours.alpha == pytest.approx(ref.alpha, rel=1e-6)


def test_fit_is_scale_invariant_and_min_tail_is_respected():
    values = pareto(300, 2.2, 7)
    base, scaled = fit_power_law(values), fit_power_law(1e-3 * values)
    assert scaled.alpha == pytest.approx(base.alpha, rel=1e-9) and scaled.n_tail == base.n_tail
    assert scaled.x_min == pytest.approx(1e-3 * base.x_min, rel=1e-12)
    assert 0 <= base.ks_distance <= 1
    assert fit_power_law(values, min_tail=150).n_tail >= 150


def test_fit_pdf_is_a_density_on_the_tail():
    fit = fit_power_law(pareto(300, 2.5, 4))
    grid = np.geomspace(fit.x_min, fit.x_min * 1e7, 400_001)
    integral = np.trapezoid(fit.pdf(grid), grid)
    assert integral == pytest.approx(1, abs=1e-3) and fit.pdf(np.array([fit.x_min / 2]))[0] == 0


def test_fit_degenerate_inputs():
    short = fit_power_law(np.arange(1.0, 10.0))
    assert math.isnan(short.alpha) and short.n_tail == 0 and "fewer than min_tail=10" in short.reason
    flat = fit_power_law(np.full(30, 2.0))
    assert math.isnan(flat.alpha) and "single repeated value" in flat.reason
    dropped = fit_power_law(np.r_[np.zeros(50), -1e-9, np.arange(1.0, 5.0)])
    assert dropped.n == 4 and not dropped.ok and math.isnan(dropped.alpha_stderr)
    with pytest.raises(MBEInputError, match="NaN or infinite"):
        fit_power_law(np.array([1.0, np.nan, 3.0]))
    with pytest.raises(MBEInputError, match="1-d"):
        fit_power_law(np.ones((3, 3)))
    with pytest.raises(MBEInputError, match="min_tail"):
        fit_power_law(np.ones(30), min_tail=1)


@pytest.mark.parametrize("alpha, label", [(1.5, "heavy-tailed"), (3.0, "heavy-tailed"),
                                          (3.2, "moderately heavy-tailed"), (4.5, "random-like"),
                                          (float("nan"), "unfitted")])
def test_phenomenology_bins(alpha, label):
    assert phenomenology(alpha) == label and label in PHENOMENOLOGY


# --------------------------------------------------------------------------- #
# Models                                                                      #
# --------------------------------------------------------------------------- #

def test_weight_spectra_of_an_mlp_equal_numpy():
    torch = pytest.importorskip("torch")
    from mbe_helpers.models import MLP

    torch.manual_seed(0)
    model = MLP(40, [30, 20], 10)
    table = weight_spectra(model)
    assert list(table.layer) == ["net.0", "net.2", "net.4"] and set(table.kind) == {"dense"}
    for row, module in zip(table.itertuples(), [model.net[0], model.net[2], model.net[4]]):
        w = module.weight.detach().numpy()
        assert (row.n_out, row.n_in) == w.shape
        assert row.erank == pytest.approx(erank_by_definition(w), rel=1e-9)
        assert row.spectral_norm == pytest.approx(np.linalg.norm(w.astype(float), 2), rel=1e-9)
        assert row.alpha_weighted_ln == pytest.approx(row.alpha * math.log(row.lambda_max), rel=1e-12)
    assert "alpha_weighted_log10" in weight_spectra(model, log_base="10").columns


def test_conv_modes():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(8, 3, 3, 3))
    flat = weight_spectra({"conv": w}, conv="flatten").iloc[0]
    assert (flat.n_out, flat.n_in, flat.rank_max, flat.conv) == (8, 27, 8, "flatten")
    assert flat.erank == pytest.approx(erank_by_definition(w.reshape(8, 27)), rel=1e-12)
    sliced = weight_spectra({"conv": w}, conv="slices").iloc[0]
    diag = block_diag(*[w[:, :, i, j] for i in range(3) for j in range(3)])
    assert (sliced.n_out, sliced.n_in, sliced.n_blocks, sliced.rank_max) == (8, 3, 9, 27)
    assert sliced.erank == pytest.approx(erank_by_definition(diag), rel=1e-12)
    assert sliced.nuclear_norm == pytest.approx(np.linalg.norm(diag, "nuc"), rel=1e-12)
    assert sliced.stable_rank == pytest.approx(np.linalg.norm(diag, "fro") ** 2 / np.linalg.norm(diag, 2) ** 2)
    assert sliced.frobenius_norm == pytest.approx(flat.frobenius_norm, rel=1e-12)
    assert sorted(layer_esds({"conv": w}, conv="slices")["conv"]) == pytest.approx(
        sorted(np.linalg.svd(diag, compute_uv=False) ** 2 / 8))


def test_torch_conv_model_is_walked():
    pytest.importorskip("torch")
    from mbe_helpers.models import SmallCNN, ViTMini

    cnn = weight_spectra(SmallCNN((1, 8, 8), 10, channels=(4, 6)), conv="slices")
    assert list(cnn.kind) == ["conv", "conv", "dense"] and list(cnn.n_blocks) == [9, 9, 1]
    vit = weight_spectra(ViTMini((1, 8, 8), 10, patch=4, width=8, n_blocks=1, n_heads=2))
    assert "blocks.0.attn.out_proj" in set(vit.layer) and "patch_embed" in set(vit.layer)


def test_alpha_hat_is_the_layer_mean_in_the_named_base():
    rng = np.random.default_rng(6)
    weights = {f"w{i}": rng.standard_t(3, size=(120, 80)) for i in range(3)}
    weights["tiny"] = rng.normal(size=(4, 3))  # too few eigenvalues: excluded from the mean
    table = weight_spectra(weights)
    fitted = table.dropna(subset=["alpha"])
    assert len(fitted) == 3 and "fewer than" in table.set_index("layer").loc["tiny", "reason"]
    expected = np.mean([r.alpha * math.log(r.lambda_max) for r in fitted.itertuples()])
    assert alpha_hat(weights) == pytest.approx(expected, rel=1e-12)
    assert alpha_hat(weights, log_base="10") == pytest.approx(expected / math.log(10), rel=1e-12)
    summary = spectral_metrics(weights)
    assert summary["alpha_hat_ln"] == pytest.approx(expected) and summary["n_layers_fitted"] == 3
    assert summary["sci"] == pytest.approx(table.sci.mean())
    assert math.isnan(alpha_hat({"tiny": weights["tiny"]}))


def test_bad_requests():
    w = {"w": np.ones((3, 3))}
    with pytest.raises(MBEInputError, match="conv mode"):
        weight_spectra(w, conv="pooled")
    with pytest.raises(MBEInputError, match="log base"):
        alpha_hat(w, log_base="2")
    with pytest.raises(MBEInputError, match="dimensions"):
        weight_spectra({"w": np.ones(3)})
    with pytest.raises(MBEInputError, match="no Linear or Conv2d"):
        layer_weights({})
    with pytest.raises(MBEInputError, match="nn.Module or a mapping"):
        weight_spectra([np.ones((3, 3))])


def test_importing_spectral_does_not_import_torch():
    code = "import sys, mbe_helpers.spectral; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_plot_esd_draws_one_panel_per_layer():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mbe_helpers.plots import plot_esd

    rng = np.random.default_rng(8)
    weights = {"big": rng.standard_t(3, size=(150, 60)), "conv": rng.normal(size=(6, 4, 3, 3)),
               "tiny": rng.normal(size=(3, 2)), "flat": np.eye(20)}
    fig = plot_esd(weights)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 4
    titles = {ax.get_title().split(":")[0]: ax.get_title() for ax in panels}
    assert "α =" in titles["big"] and "no fit" in titles["tiny"] and "no fit" in titles["flat"]
    assert len(panels[0].get_lines()) == 2  # fitted tail and x_min
    plt.close(fig)
    with pytest.raises(MBEInputError, match="unknown"):
        plot_esd(weights, layers=["nope"])
