"""Side-by-side timing shared by the bench scripts (imported from the script's own folder)."""

from __future__ import annotations

import statistics
import time


def alternating(fns: dict, reps: int, warmup: bool = True) -> tuple[dict, dict]:
    """Optionally one warm-up of each, then ``reps`` rounds calling each in turn; medians and last outputs."""
    outs = {name: fn() for name, fn in fns.items()} if warmup else {}
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outs


def speed(ratio: float) -> str:
    """``"3.2x faster"`` or ``"2.0x slower"`` for a ratio of peer time over ours."""
    return f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"
