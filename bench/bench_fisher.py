"""Benchmark: the per-sample-gradient Gram D = G G^T / N, our engine against the alternatives.

Every method computes the same D (float32, CPU, 2 threads) on the same batch;
times are medians of REPS repetitions after one warm-up, measured side by
side in one run (a call over one second is its own warm-up).  Alternatives:
the reference loop (one backward per sample, the definition), ``torch.func``
(``vmap(grad)``), and BackPACK (``BatchGrad``) and Opacus
(``GradSampleModule``) when they are installed; every alternative
materialises G (N x P) and multiplies it out.  "diff" is max|D - D64| /
max|D64| with D64 our engine in float64 (equal to the one-backward-per-sample
oracle to ~1e-15 in tests/test_fisher.py).  Alternatives are skipped where G
alone would exceed MAX_G_GB.

Run: ``python bench/bench_fisher.py [LABEL-SUBSTRING ...]`` (default: every case).
"""

from __future__ import annotations

import copy
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from mbe_helpers.fisher import per_sample_gram
from mbe_helpers.models import MLP, SmallCNN

REPS = 5
MAX_G_GB = 2.5
CASES = [  # (label, model factory, input shape, N)
    ("MLP 784-256-256-10", lambda: MLP(784, [256, 256], 10), (784,), 64),
    ("MLP 784-256-256-10", lambda: MLP(784, [256, 256], 10), (784,), 256),
    ("MLP 784-256-256-10", lambda: MLP(784, [256, 256], 10), (784,), 1024),
    ("MLP 3072-512-512-10", lambda: MLP(3072, [512, 512], 10), (3072,), 64),
    ("MLP 3072-512-512-10", lambda: MLP(3072, [512, 512], 10), (3072,), 256),
    ("MLP 3072-512-512-10", lambda: MLP(3072, [512, 512], 10), (3072,), 1024),
    ("SmallCNN 3x32x32", lambda: SmallCNN((3, 32, 32), 10), (3, 32, 32), 256),
]


# --------------------------------------------------------------------------- #
# Methods: each returns D (N, N)                                              #
# --------------------------------------------------------------------------- #

def ours(model, x, y):
    return per_sample_gram(model, x, y)


def reference_loop(model, x, y):
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    g = torch.stack(rows)
    return g @ g.T / len(x)


def torch_func(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    grads = vmap(grad(loss_of), in_dims=(None, 0, 0))(params, x, y)
    g = torch.cat([v.reshape(len(x), -1) for v in grads.values()], 1)
    return g @ g.T / len(x)


def as_sequential(model) -> nn.Sequential:
    """The same layers (same weights) as one nn.Sequential, the form BackPACK extends."""
    if isinstance(model, SmallCNN):
        return nn.Sequential(*model.features, nn.Flatten(), model.head)
    return nn.Sequential(nn.Flatten(), *model.net)


def make_backpack(model):
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    extended = extend(as_sequential(copy.deepcopy(model)))
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))

    def run(_, x, y):
        with backpack(BatchGrad()):
            loss_fn(extended(x), y).backward()
        g = torch.cat([p.grad_batch.reshape(len(x), -1) for p in extended.parameters()], 1)
        extended.zero_grad(set_to_none=True)
        return g @ g.T / len(x)
    return run


def make_opacus(model):
    from opacus import GradSampleModule

    wrapped = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    wrapped.train()  # Opacus records activations only in train mode (the benchmark models have no BN/Dropout)

    def run(_, x, y):
        F.cross_entropy(wrapped(x), y, reduction="sum").backward()
        g = torch.cat([p.grad_sample.reshape(len(x), -1) for p in wrapped.parameters()], 1)
        wrapped.zero_grad(set_to_none=True)
        return g @ g.T / len(x)
    return run


def optional_methods(model) -> tuple[dict, list[str]]:
    methods, notes = {}, []
    for name, factory in (("BackPACK", make_backpack), ("Opacus", make_opacus)):
        try:
            methods[name] = factory(model)
        except ImportError:
            notes.append(f"{name} not installed: skipped (pip install "
                         f"{'backpack-for-pytorch' if name == 'BackPACK' else 'opacus'})")
    return methods, notes


# --------------------------------------------------------------------------- #
# Timing                                                                      #
# --------------------------------------------------------------------------- #

def median_time(fn, *args) -> tuple[float, torch.Tensor]:
    """Median of REPS timed calls; the first call is a warm-up unless it takes over a second."""
    start = time.perf_counter()
    result = fn(*args)
    first = time.perf_counter() - start
    times = [first] if first > 1.0 else []
    while len(times) < REPS:
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result.detach()


def run_case(label, factory, shape, n, extra_notes) -> list[str]:
    torch.manual_seed(0)
    model = factory().eval()
    x, y = torch.randn(n, *shape), torch.randint(0, 10, (n,))
    g_gb = n * sum(p.numel() for p in model.parameters()) * 4 / 1e9
    methods = {"ours": ours, "reference loop": reference_loop, "torch.func": torch_func}
    optional, notes = optional_methods(model)
    methods.update(optional)
    extra_notes.update(notes)
    times, grams = {}, {}
    for name, fn in methods.items():
        if name != "ours" and g_gb > MAX_G_GB:
            continue
        times[name], grams[name] = median_time(fn, model, x, y)
    ref = per_sample_gram(model, x, y, dtype=torch.float64)
    lines = []
    for name in methods:
        if name not in times:
            lines.append(f"{label:<20} {n:>5} {name:<15} {'skipped: G would need %.1f GB' % g_gb}")
            continue
        diff = float((grams[name].double() - ref).abs().max() / ref.abs().max())
        ratio = times[name] / times["ours"]
        lines.append(f"{label:<20} {n:>5} {name:<15} {times[name] * 1e3:>10.1f} {ratio:>9.1f}x {diff:>10.1e}")
    others = {k: t for k, t in times.items() if k not in ("ours", "reference loop")}
    if others:
        best = min(others, key=others.get)
        loop = times.get("reference loop", float("nan")) / times["ours"]
        lines.append(f"{'':<26} -> ours is {loop:.1f}x faster than the loop, "
                     f"{others[best] / times['ours']:.1f}x faster than {best} (the fastest library)")
    return lines


PEAK_SCRIPT = """
import re, torch
torch.set_num_threads(2)
from mbe_helpers.fisher import per_sample_gram
from mbe_helpers.models import MLP

def status_mib(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024

torch.manual_seed(0)
model = MLP(784, [256, 256], 10).eval()
x, y = torch.randn(4096, 784), torch.randint(0, 10, (4096,))
per_sample_gram(model, x[:8], y[:8])
base = status_mib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size
per_sample_gram(model, x, y)
print(status_mib("VmHWM") - base)
"""


def peak_memory_line() -> str:
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True)
    g_gb = 4096 * sum(p.numel() for p in MLP(784, [256, 256], 10).parameters()) * 4 / 1e9
    measured = f"+{float(out.stdout):.0f} MiB peak resident memory" if out.returncode == 0 else \
        "peak not measurable here (/proc/self/clear_refs refused)"
    return (f"Peak memory, ours, MLP 784-256-256-10 at N = 4096: {measured} over the loaded model and batch "
            f"(D itself is {4096 ** 2 * 4 / 2 ** 20:.0f} MiB; materialising G would need {g_gb:.1f} GB).")


def main() -> None:
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {REPS} reps, float32 CPU")
    print(f"{'model':<20} {'N':>5} {'method':<15} {'ms':>10} {'vs ours':>10} {'diff':>10}")
    notes: set[str] = set()
    wanted = sys.argv[1:]  # optional substrings of the case labels, e.g. "784" or "CNN"
    for case in CASES:
        if wanted and not any(w in f"{case[0]} {case[3]}" for w in wanted):
            continue
        for line in run_case(*case, notes):
            print(line, flush=True)
    for note in sorted(notes):
        print(note)
    print(peak_memory_line())


if __name__ == "__main__":
    main()
