"""Simulated ledgers of training runs whose truth is known.

The method chapter (``book/00_method.ipynb``) shows what the MBE audit
catches on data where we know the answer. One row is one simulated trained
network; four candidate metrics are built so that each one should land in a
different outcome class of :func:`mbe_helpers.audit.classify` when audited
against ``final_acc`` with the controls ``early_loss`` and ``arch``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

#: Architecture offsets on the latent accuracy score (between-group effect).
ARCH_OFFSETS = {"mlp": -1.5, "cnn": 0.0, "vit": 1.5}

#: The outcome class each simulated metric is built to receive.
EXPECTED_CLASSES = {
    "loss_proxy": "washout",
    "independent_signal": "survives",
    "random_metric": "weak-or-mixed",
    "simpson_metric": "sign-inversion",
}

CONTROLS = ("early_loss", "arch")
TARGET = "final_acc"


def simulate_method_cases(n: int = 400, metric_noise: float = 0.5, target_noise: float = 0.3,
                          baseline_noise: float = 0.3, seed: int = 0) -> pd.DataFrame:
    r"""Simulate ``n`` training runs carrying four candidate metrics with known truth.

    Each run has three independent standard-normal latents, a capability
    :math:`c` (what early loss sees), a trait :math:`s` and a quirk :math:`u`
    (both invisible to early loss), and an architecture ``arch`` drawn
    uniformly from :data:`ARCH_OFFSETS` with offset :math:`a`. Then

    .. math::

        \ell &= -c + \sigma_b \varepsilon_b, \qquad
        \mathrm{early\_loss} = e^{\ell / 2},\\
        \mathrm{final\_acc} &= \operatorname{expit}\big((c + s + u + a + \sigma_y \varepsilon_y)/2\big),

    (monotone maps leave every rank statistic unchanged) and the metrics,
    each with its own measurement noise :math:`\sigma_m \varepsilon`:

    ``loss_proxy`` = :math:`\ell + \sigma_m\varepsilon`
        A disguised loss proxy: it predicts accuracy only through
        capability, which early loss already measures. Raw rho is strongly
        negative, partial rho given early loss is about 0: **washout**.
    ``independent_signal`` = :math:`s + \sigma_m\varepsilon`
        Genuine information beyond the baseline: raw and partial rho are
        both clearly positive: **survives**.
    ``random_metric`` = :math:`\sigma_m\varepsilon`
        Pure noise: both correlations near 0: **weak-or-mixed**.
    ``simpson_metric`` = :math:`u - 2a + \sigma_m\varepsilon`
        A Simpson-type metric: across architectures it is high where
        accuracy is low (raw rho negative), but within every architecture it
        tracks the quirk and so accuracy positively. Controlling for ``arch``
        (a categorical control) flips the sign: **sign-inversion**.

    Parameters
    ----------
    n : int
        Number of runs (rows).
    metric_noise, target_noise, baseline_noise : float
        Standard deviations :math:`\sigma_m`, :math:`\sigma_y`, :math:`\sigma_b`.
    seed : int
        Seed of the random generator; the same seed gives the same table.

    Returns
    -------
    pandas.DataFrame
        Columns ``run, arch, early_loss, final_acc`` and the four metrics of
        :data:`EXPECTED_CLASSES`.
    """
    rng = np.random.default_rng(seed)
    arch = rng.choice(list(ARCH_OFFSETS), size=n)
    offset = np.array([ARCH_OFFSETS[a] for a in arch])
    capability, trait, quirk = rng.standard_normal((3, n))
    loss_latent = -capability + baseline_noise * rng.standard_normal(n)
    score = capability + trait + quirk + offset + target_noise * rng.standard_normal(n)
    noise = metric_noise * rng.standard_normal((4, n))
    return pd.DataFrame({
        "run": np.arange(n),
        "arch": arch,
        "early_loss": np.exp(loss_latent / 2),
        "final_acc": 1.0 / (1.0 + np.exp(-score / 2)),
        "loss_proxy": loss_latent + noise[0],
        "independent_signal": trait + noise[1],
        "random_metric": noise[2],
        "simpson_metric": quirk - 2.0 * offset + noise[3],
    })


def compare_with_truth(classes: Mapping[str, str],
                       expected: Mapping[str, str] = EXPECTED_CLASSES) -> pd.DataFrame:
    """Put observed classes next to the expected ones.

    Parameters
    ----------
    classes : mapping of metric to observed class
    expected : mapping of metric to expected class

    Returns
    -------
    pandas.DataFrame
        Index ``metric``; columns ``expected``, ``observed`` and ``as_expected``.
    """
    frame = pd.DataFrame({"expected": pd.Series(dict(expected), dtype=object)})
    frame["observed"] = [classes.get(m, "missing") for m in frame.index]
    frame["as_expected"] = frame["expected"] == frame["observed"]
    frame.index.name = "metric"
    return frame
