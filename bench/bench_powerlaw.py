"""Benchmark: our vectorised power-law fit against ``powerlaw.Fit`` on the ESDs of a trained MLP.

An MLP 64-1024-1024-10 is trained for a few epochs on UCI digits (offline,
scikit-learn); each layer's ESD (sigma^2 / N) is fitted by both, side by side
in one run, median of REPS repetitions.  Both run the same estimator: Clauset's
continuous MLE with x_min at the minimal KS distance.  Ours uses min_tail=3,
which is exactly powerlaw.Fit's candidate set (it never tries the two largest
values); powerlaw.Fit gets parameter_ranges={"alpha": [1, None]}, because
powerlaw 2.x by default bounds alpha to (0, 3) and would refit light tails
numerically against that bound.

Run: ``python bench/bench_powerlaw.py``.
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from mbe_helpers.models import MLP
from mbe_helpers.spectral import fit_power_law, layer_esds

REPS = 5


def trained_mlp(epochs: int = 8, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    model = MLP(64, [1024, 1024], 10, activation="relu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def median_time(fn) -> tuple[float, object]:
    result = fn()
    times = []
    for _ in range(REPS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    try:
        import powerlaw
    except ImportError:
        print("powerlaw not installed: nothing to compare against (pip install powerlaw)")
        return
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    model = trained_mlp()
    version = getattr(powerlaw, "__version__", "?")
    print(f"powerlaw {version}, median of {REPS} reps, ESDs of a trained MLP 64-1024-1024-10")
    print(f"{'layer':<7} {'n':>5} {'ours ms':>9} {'powerlaw ms':>12} {'speed-up':>9} {'alpha ours':>11} "
          f"{'alpha powerlaw':>15} {'|diff|':>9} {'x_min same':>10}")
    total_ours = total_ref = 0.0
    for name, eigs in layer_esds(model).items():
        t_ours, ours = median_time(lambda: fit_power_law(eigs, min_tail=3))
        t_ref, ref = median_time(lambda: powerlaw.Fit(eigs, verbose=False, parameter_ranges={"alpha": [1, None]}))
        total_ours, total_ref = total_ours + t_ours, total_ref + t_ref
        print(f"{name:<7} {eigs.size:>5} {t_ours * 1e3:>9.2f} {t_ref * 1e3:>12.1f} {t_ref / t_ours:>8.0f}x "
              f"{ours.alpha:>11.6f} {ref.alpha:>15.6f} {abs(ours.alpha - ref.alpha):>9.1e} "
              f"{str(bool(ours.x_min == ref.xmin)):>10}")
    print(f"all layers: ours {total_ours * 1e3:.2f} ms, powerlaw.Fit {total_ref * 1e3:.1f} ms, "
          f"speed-up {total_ref / total_ours:.0f}x")


if __name__ == "__main__":
    main()
