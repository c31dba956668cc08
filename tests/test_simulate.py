"""The simulated runs of the method chapter carry the truth they claim to."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mbe_helpers import audit
from mbe_helpers.simulate import (
    CONTROLS, EXPECTED_CLASSES, TARGET, compare_with_truth, simulate_method_cases,
)


def test_columns_and_shape() -> None:
    runs = simulate_method_cases(n=50, seed=0)
    assert list(runs.columns) == ["run", "arch", "early_loss", TARGET, *EXPECTED_CLASSES]
    assert len(runs) == 50 and set(runs.arch) <= {"mlp", "cnn", "vit"}
    assert runs.early_loss.gt(0).all() and runs[TARGET].between(0, 1).all()


def test_same_seed_same_table_other_seed_other_table() -> None:
    pd.testing.assert_frame_equal(simulate_method_cases(seed=4), simulate_method_cases(seed=4))
    assert not simulate_method_cases(seed=4).equals(simulate_method_cases(seed=5))


def test_simpson_metric_flips_sign_within_architectures() -> None:
    runs = simulate_method_cases(n=3000, seed=1)
    assert stats.spearmanr(runs.simpson_metric, runs[TARGET])[0] < -0.2
    for _, group in runs.groupby("arch"):
        assert stats.spearmanr(group.simpson_metric, group[TARGET])[0] > 0.2


def test_noise_controls_the_strength_of_the_signal() -> None:
    quiet = simulate_method_cases(n=3000, metric_noise=0.1, seed=2)
    loud = simulate_method_cases(n=3000, metric_noise=3.0, seed=2)
    rho = [abs(stats.spearmanr(d.independent_signal, d[TARGET])[0]) for d in (quiet, loud)]
    assert rho[0] > rho[1] + 0.2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_audit_recovers_the_expected_classes_on_large_samples(seed: int) -> None:
    runs = simulate_method_cases(n=3000, seed=seed)
    result = audit(runs, list(EXPECTED_CLASSES), TARGET, CONTROLS)
    assert dict(zip(result.table.metric, result.table.classification)) == EXPECTED_CLASSES


def test_compare_with_truth_flags_misses() -> None:
    observed = dict(EXPECTED_CLASSES, random_metric="survives")
    frame = compare_with_truth(observed)
    assert frame.loc["random_metric", "observed"] == "survives"
    assert frame.as_expected.tolist() == [True, True, False, True]
    assert compare_with_truth({}).observed.eq("missing").all()
    assert np.issubdtype(frame.as_expected.dtype, np.bool_)


def test_workers_set_up_for_the_monte_carlo_give_the_numbers_of_one_process() -> None:
    from mbe_helpers.simulate import run_calibration

    def table(workers: int) -> pd.DataFrame:
        return run_calibration(["independent_null", "clustered_null"], n=[60], reps=8,
                               progress=False, workers=workers).drop(columns="seconds")

    pd.testing.assert_frame_equal(table(2), table(1))    # pool workers run worker_setup
