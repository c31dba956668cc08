"""Size and power of the cross-fitted test under another grid of interaction scales.

Runs :func:`mbe_helpers.simulate.run_calibration` (crossfit only, every
scenario, n = 60, 150, 300, 1000) with the learner's ``_INTERACTION_SCALES``
replaced, writes ``scales_<grid>_<seed>.csv`` and prints the rates and the
worker time, so two grids can be compared on the same seeds (the choice in
``mbe_helpers/crossfit.py``'s docstring was made with seeds 5-8, 100
repetitions each):

    python bench/learner_scales.py base 100 5      # the grid in the module
    python bench/learner_scales.py 0,1,3 100 5     # another grid
"""

import sys
import time

from mbe_helpers import crossfit
from mbe_helpers.simulate import run_calibration


def main() -> None:
    grid, reps, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if grid != "base":
        crossfit._INTERACTION_SCALES = tuple(float(v) for v in grid.split(","))
    start = time.time()
    table = run_calibration(n=(60, 150, 300, 1000), reps=reps, methods=("crossfit",), workers=2,
                            progress=False, seed=seed)
    print(f"scales {crossfit._INTERACTION_SCALES}: wall {time.time() - start:.1f} s, "
          f"worker {table.seconds.sum():.1f} s")
    table.to_csv(f"scales_{grid}_{seed}.csv", index=False)
    print(table.pivot(index="scenario", columns="n", values="rate").round(3))


if __name__ == "__main__":
    main()
