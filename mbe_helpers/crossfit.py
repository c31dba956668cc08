r"""Cross-fitted nonlinear adjustment for controls, and the studentised GCM test.

The rank-linear partial correlation removes from :math:`\operatorname{rank}(M)`
and :math:`\operatorname{rank}(Y)` only what is *linear* in the ranked
controls :math:`B`. A metric that follows a U-shaped or interacting function
of the controls survives that adjustment although it says nothing new. Here
both responses are instead predicted by a flexible learner
:math:`\hat f_{-k}(B) \approx E[\operatorname{rank} V \mid B]` fitted on the
other folds, and the out-of-fold residuals

.. math:: e_{V,i} = \operatorname{rank}(V)_i / n - \hat f_{-k(i)}(B_i)

are tested with the generalised covariance measure (Shah & Peters 2020),
calibrated for the cross-fit as below.

The p-value
-----------
At small n the out-of-fold errors of the two regressions are correlated
across rows (they are smooth functions fitted on the same training rows), so
the plain variance of the products :math:`R_i = e_{M,i} e_{Y,i}` is too small
and the GCM's t reference is anti-conservative. ``adj_p`` therefore
calibrates the studentised statistic

.. math:: T = \frac{S}{\sqrt{\frac{G}{G-1} \sum_g (S_g - n_g S / n)^2}},
          \qquad S = \sum_i R_i, \quad S_g = \sum_{i \in g} R_i,

by a wild refit: the target's residuals are sign-flipped (per row, or per
cluster), :math:`Y^* = \eta \circ e_Y`, residualised again with the very fits
(penalty, interaction scale) chosen for the target, and the observed
:math:`|T|` is ranked among the :math:`|T^*|`. One draw is one matrix product
for every metric and placebo at once.

The refit's inflation of the variance also has a closed form. Write the
target's cross-fit as a linear operator, :math:`e_Y = A\,\operatorname{rank}(Y)/n`
(identity on the fold's rows minus the fold's fit from the other rows);
with :math:`w = A^\top e_M`,

.. math::

   \operatorname{Var}^*(S^*) = \sum_g \Big(\sum_{i \in g} w_i e_{Y,i}\Big)^2,
   \qquad
   E^*\Big[\sum_g S_g^{*2}\Big] = \sum_g \Big[\big(e_{M,g}^\top e_{Y,g}\big)^2
      + \big\lVert Q_g^\top e_{M,g} \big\rVert^2\Big],

where :math:`Q_g` holds the fold's fit weights of cluster :math:`g`'s rows,
summed within every training cluster and weighted by :math:`e_Y`; their ratio
:math:`\tau^2` (:func:`wild_scale`) is the wild bootstrap's :math:`E^*[T^{*2}]`
as a ratio of expectations. It widens the interval below. It does not replace
the draws: referring :math:`T / \tau` to Student's t gave the same sizes on
every scenario of :mod:`mbe_helpers.simulate` (100 repetitions at n = 60, 300
and 1000) at a quarter of the cost, but at n = 60 with seven controls the
refitted :math:`T^*` has light tails (kurtosis 2.2), and chapter 2's positive
control got p = 0.009 from the t reference against 0.00015 from 20,000 draws.

The reported effect, ``adj_r``, is the Pearson correlation of the
residuals, with a Fisher-z interval whose standard error comes from the
correlation's influence function :math:`\psi_i = a_i b_i - r (a_i^2 +
b_i^2) / 2` (standardised residuals :math:`a, b`; summed per cluster),
inflated by :math:`\tau`, and widened to reach 0 where ``adj_p`` is not
below the interval's level: the interval never excludes 0 where the test
does not reject.

The learner
-----------
A linear smoother: ridge regression on a basis of the controls,

* a numeric control with at most :data:`LEVELS_AS_CATEGORY` distinct values
  is one-hot encoded (any function of it is then fitted exactly, steps too);
  otherwise its rank :math:`u \in (0, 1]` enters through a linear term and
  24 hinges :math:`(u - \kappa)_+` (ranked responses make kinks: a U in the
  control is a V in ranks);
* a categorical control is one-hot encoded;
* every pair of controls adds the tensor products of their low-order
  features (a cubic B-spline with two interior knots for a numeric rank, the
  one-hot columns of a category), plus the bilinear product of two numeric
  ranks with a nine times weaker penalty (the commonest interaction): a best
  learning rate that moves with the optimizer or the width is absorbed;
* three-way products of the linear terms (every triple of centred numeric
  ranks, every pair of them times each one-hot column: an lr x wd
  interaction whose sign flips with the optimizer), where the rows suffice
  for them and the smooth block together (:func:`_three_way_block`);
* a *smooth block*, nine times more lightly penalised than the rest
  (weight :data:`_SMOOTH_WEIGHT`): a cubic Legendre polynomial of every
  numeric rank, the one-hot columns, and the product of every numeric rank's
  linear term with every one-hot column and of one-hot columns of two
  controls (:func:`_smooth_blocks`). The main-effects fit gets the numeric
  polynomials, the fit with interactions all of it. It enters only where
  there are at least :data:`SMOOTH_ROWS_PER_COLUMN` rows per column of it
  (five controls as in a training grid: from 34 rows; eight controls with
  two categories: from 82);
* every numeric control with many values adds one step column
  :math:`3\,(u > \kappa)`, cut on each fold where the running mean of the
  target's training ranks jumps most (:func:`_step_cuts`), and one more
  per level of every one-hot control, cut on that level's rows
  (:func:`_level_steps`: a step whose place moves with the optimizer). The
  cuts come from the target alone, so one factorisation per fold still
  serves every metric and placebo; and the GCM's bias is the product of the
  two fits' errors, so a step that the target shares with a metric is
  removed once the target's fit has it.
* every *target* (the response the others are tested against, and the ones
  whose fits the wild refits keep) also gets a *single index* in its fit
  with interactions, where the smooth block entered: the ridge fit of its
  normal scores on the smooth block and the bilinear products of the
  numeric ranks, ranked and expanded into a linear term and 8 hinges
  (:func:`_single_index`), built on each fold from the target's own
  training rows, and one step along the slanted line of two numeric ranks
  where the target's training rows jump most (:func:`_oblique_step`: an
  edge of divergence). Both enter the target's fit only, solved through the
  fold's spectrum by Woodbury (:func:`_index_ridge`: no factorisation of
  their own).

* the responses under test (metrics and placebos: every column but the
  target and the fits kept for the wild refits) are fitted on the
  normal-score scale, :math:`z = \Phi^{-1}(\operatorname{rank}/(n + 1))`,
  and brought back to the rank scale through the probit identity
  :math:`E[\Phi(z) \mid B] = \Phi\big(m(B) / \sqrt{1 + s^2}\big)` for
  :math:`z \mid B \sim N(m(B), s^2)`, with :math:`m` the ridge fit of
  :math:`z` and :math:`s^2` its GCV score: the residual stays a bounded rank
  residual, :math:`\operatorname{rank}/(n + 1) - \Phi(\hat m / \sqrt{1 +
  s^2})`.

Why the link. The rank of an additive signal plus noise is a squashed
function of the controls, :math:`E[\operatorname{rank} V / n \mid B] =
G(f(B))`, with interactions of every order that a basis of main effects and
pairs cannot fit; on the normal-score scale the same signal is additive
again (exactly so for Gaussian data) and the link :math:`G` has the closed
form above. The GCM's bias is the product of the two fits' errors, so one
side fitted well is enough, and only the tested side is given the link:
the target keeps the linear fit of its ranks, so the wild refit below stays
a linear operator and is unchanged. Measured (200 repetitions each, sizes
at n = 60, 150, 300 and 1000): the additive proxy through five controls
(``additive_proxy_5`` of :mod:`mbe_helpers.simulate`, held out when the
learner was chosen) went from 16, 23.5, 37.5 and 63 % to 5.5, 4.5, 3.5 and
3 % (seed 0; the held-out run of ``bench/unseen_nulls.py``, seed 21: 16,
34, 42, 58 % to 9, 6, 3.5, 3 %), the additive proxy through three controls
from 12, 9, 9.5, 8.5 % to 5, 3.5, 5.5, 4.5 %; the mean GCM statistic on the
five-control proxy at n = 1000 fell from +2.56 to -0.17 (100 repetitions).
Every other size of both sets, the interval coverage and the power on
every signal stayed within Monte Carlo error. On ten weak signals
(``bench/weak_signals.py``, n = 60, 150 and 300, 200 repetitions) the power
stayed within 2 points of the linear fit in every cell but one: a
near-deterministic confounder (three controls explain the metric but for a
small trait) at n = 60, 96 % with the linear fit and 80 % with the link
(100 % either way from n = 150). Fitting the linked side without the
undersmoothing below kept that loss (84.5 %) and cost size (the grid-shaped
proxy below 28 % at n = 300); a per-column choice of the link was not tried.
On chapter 2's grid (n = 60, eight controls) the positive control's adjusted
p given baseline and design went from 0.028 to 0.127, one ledger; its
simulated counterpart, an accuracy and its noisy copy beside seven
controls, kept its power (94 % at n = 60 with either fit). The link on both
sides fixed the five-control proxy as well but doubled the bias on the
U-shaped proxy (mean statistic +0.15 to +0.56 at n = 1000): there the
normal score of a skewed response is not Gaussian given the control, and
the rank fit is the better one. Measured before and not kept: normal
scores as the residual itself (their long tails widened the adjusted
interval on near-noiseless confounding and cost power), hinges of an
additive index of the target (11.5, 10, 10.5, 4 % on the five-control
proxy), nested and pairwise variants of that index, and trilinear products
of the numeric ranks.

Why the smooth block. Hinges under one ridge penalty are a rough prior: on a
proxy shaped like a training grid through five controls (``grid_proxy_5``:
an optimum learning rate that moves with the optimizer, a kink in the weight
decay, a width x depth product; held out when the learner was chosen) the
target's out-of-fold R^2 at n = 60 was -0.28 at the penalty GCV chose, and
below zero at every penalty from 1e-3 to 1e3 times the mean squared singular
value, while a ridge on a quadratic in the learning rate and its product
with the optimizer reached 0.41 (0.50 with the true index as the only
control). The test then rejected this null 57, 22, 14 and 8 % of the time at
n = 60, 150, 300 and 1000 (``bench/unseen_nulls.py``, 200 repetitions). A
low-order polynomial block that is cheap to use (its penalty divided by 9)
lets the ridge take the smooth explanation first and the hinges the rest: 8,
9, 8.5 and 10 % at the same n (same seed and repetitions). Measured before
and not kept (100 repetitions, every scenario of
:mod:`mbe_helpers.simulate`, ``bench/unseen_nulls.py`` and
``bench/weak_signals.py``): the polynomial block as a third candidate chosen
by GCV (14 % at n = 60 but 20 and 16 % at n = 300 and 1000), the block on
one side only (target or metric: 22-23 % at n = 60), and the block without a
floor on the rows per column, which cut the power at n = 60 with eight
controls (the accuracy and its noisy copy 97 -> 72 %, the weak eight-control
signal 73 -> 44 %). With the floor every other size and power moved within
Monte Carlo error, and the Monte Carlo takes 9-16 % longer.

Why the single index. The same grid beside three controls that do nothing
(``grid_proxy_8`` of ``bench/unseen_nulls.py``: eight controls, chapter 2's
shape) went through 56, 28, 17 and 16 % of the time at n = 60, 150, 300 and
1000 with the smooth block alone (held-out seed 21, 200 repetitions). Ridge
spreads one penalty over every control, so the idle ones dilute the fit: the
target's out-of-fold R^2 at n = 300 fell from 0.44 (five controls) to 0.29,
while with the true skill of the grid as a ninth control it was back at 0.44
and the size at 2 % (60 repetitions). The target is a monotone function of
one smooth index of the controls, and the index lies in the smooth block's
span, so a ridge of the target's normal scores on that small block
estimates it well even beside idle controls, and a handful of hinges of it
fit the monotone function. With the index (same seed and repetitions): 56,
8, 8.5 and 10 %; ``grid_proxy_5`` 4, 8, 8 and 4 % (was 8, 9, 8.5, 10);
``additive_proxy_5`` 7, 7, 3, 2.5 % (was 9, 6, 3.5, 3). n = 60 is
unchanged: there the smooth block has too few rows to enter, and the audit
withholds the claims (below). Over every scenario of
:mod:`mbe_helpers.simulate`, ``bench/unseen_nulls.py`` and
``bench/weak_signals.py`` (seed 3, 100 repetitions) every other size and
power moved within Monte Carlo error; chapter 05's Monte Carlo took 347 s of
worker time against 317 s before (reading the controls without an
intermediate DataFrame paid for part of it). Tried and not kept: the
index's columns in the shared basis, i.e. in the metrics' fits too (58, 46,
34 and 17 %, worse than without: a metric's fit then carries the target's
training noise, and the two fits' errors correlate under the null whatever
their bias); the index in both of the target's candidate fits, main effects
and with interactions (58, 13, 13, 11 %); the whole smooth block, with the
bilinear products of the numeric ranks, in the main-effects fit (58, 11, 22,
17 %).

At n = 60 the smooth block has too few rows to enter with eight controls.
There the plain audit calls ``grid_proxy_8`` ``survives`` in 15 of 40
ledgers at n = 60, and the twin placebos below do not see it (they
reject about alpha: the twins' shape is the learner's own fit, which the
learner fits), so they withhold none of those claims; the audit withholds a
claim made where the smooth block cannot enter instead
(``mbe_helpers.audit._withhold_thin_claims``). Weighting each control's
columns by its share of a first ridge fit of the target (one reweighting
step, 100 repetitions) took n = 150 from 25 to 11 % but left n = 300 at
19-20 % and cost a few points of power at n = 60: the idle controls' shares
were as large as those of the weak real ones (the weight decay, width and
depth). A random smooth function of the controls does not share the target's
misfit either, so the proxy placebos do not see it. The audit carries *twin
placebos* against such failures (:func:`cv_ridge_fit`, :func:`twin_columns`;
``mbe_helpers.audit``): a synthetic target and its twins, each the target's
ridge fit (penalty chosen by the audit's grouped folds) plus permuted
residuals, so all are conditionally independent copies of the target's
shape. They do not make the metric's test hold its size; they gate its
claims: a flagged group's claim stands only when the metric's statistic is
beyond the twins' (see the audit's ``_gate_claims_by_twins``). With the
linear fit of the metric's ranks (``bench/twin_placebos.py``, 40 ledgers per
cell, n = 60, 150, 300) they flagged 62.5, 90 and 100 % of the five-control
additive ledgers and cut their claims from 10, 7.5 and 10 % to 7.5, 2.5 and
0 %, and left every signal's hit rate unchanged; chapter 05 measures them on
the grid-shaped proxy. Withholding every claim of a flagged group instead
cost the genuine increment of ``bench/bench_crossfit.py``'s grid its
"survives": on a grid whose controls explain most of the target the twins,
an exact copy of its fitted shape, rejected almost always (199 of 200 there
before the smooth block; 10-11 of 200 with it, whose fit has the shape). A GCV
fit instead of CV flagged the clustered null (twins 74 %), and twins tested
against the real target carried its noise (25 % on the independent null).

Inside each training fold the complexity is chosen by generalised
cross-validation: a grid of ridge penalties and a scale of the interaction
block (0 = none or 1.7), one SVD of the training basis per scale, the GCV score
:math:`n\,\mathrm{RSS}(\lambda) / (n - \mathrm{df}(\lambda))^2` evaluated for
every response at once. Because the smoother is linear, one factorisation per
fold residualises the target, every metric and hundreds of placebo columns;
that is what keeps the audit's self-calibration cheap. A grid repeats each
configuration over seeds, so the factorisation is taken on the distinct rows
of the basis (:func:`_distinct_spectrum`: the same fit from an m-row
problem) and the wild refits apply the fit per configuration
(:attr:`_FoldFit.compact`). Where rows do not repeat (a random search, one
seed per configuration) and the folds are large, the fit is applied through
its factors, :math:`P = A B^\top + 1/n_{train}` (:func:`_times`), and the
(n_test, n_train) matrix is never built: one metric with ``placebos=200`` at
n = 20,000 took 121 s and 17.4 GB with it, 23.5 s and 3.7 GB without
(``bench/large_ledgers.py``). The route is chosen by size (:data:`_FACTOR_GAIN`)
and the two agree to rounding (1e-15; chapter 05's tables are identical).

What was measured to choose it (:func:`mbe_helpers.simulate.run_calibration`,
200 repetitions; sizes of the crossfit test at alpha = 0.05):

* a cubic B-spline main effect with pairwise quadratic products held the
  U-shaped proxy (7 % at n = 300) but let an inverted U whose peak moves
  with a categorical control through 100 % of the time, and a product of
  two controls 98 %; tensor-product pairs brought those to 6-7 % and 12-20 %;
* hinges instead of the B-spline halved the small-n size on the U-shape
  (28 % to 14 % at n = 60); the wild refit took the independent null at
  n = 60 from 11 % to 4-7 %;
* the bilinear term with a lighter penalty took the product proxy from 20 %
  to 5 % at n = 60 and from 10 % to 6 % at n = 300;
* two interaction scales (0, 1.7) instead of three (0, 1, 3): over 400
  repetitions of every scenario at n = 60, 150, 300 and 1000
  (``bench/learner_scales.py``, seeds 5-8) the mean size on the nulls was
  5.38 % against 5.35 %, the same four cells lay outside [2 %, 8 %], the
  power was unchanged, and the Monte Carlo took 27 % less time;
* leave-one-out instead of GCV, fixed step functions, a second single-index
  stage, finer pair splines and hinges that multiply with n cost 2-5x the
  time and lowered no size;
* undersmoothing: the penalty GCV picks is divided by :data:`UNDERSMOOTH`
  = 10. GCV minimises the prediction error, but the GCM needs the *product*
  of the two fits' errors to vanish faster than :math:`n^{-1/2}`, and the
  two fits of a proxy share their bias (on the U-shaped proxy the mean of
  :math:`T` was +0.86 at n = 60). Dividing by 10 took that proxy from 14 %
  to 9 % at n = 60 (100 repetitions, wild p) and left every other size and
  the power within Monte Carlo error; dividing by 100 gained nothing more.

A sharp step in a control (the step proxy) was its blind spot without the
step column: the ridge put a ramp across the step, both fits shared that
bias (mean :math:`T` +0.7 at n = 300, +1.0 at n = 1000), and the size was
9.5, 7, 6.5 and 15 % at n = 60, 150, 300 and 1000 (200 repetitions, seed
5); 48 or 96 hinges, fixed step indicators beside the hinges and a
penalty divided by 100 had left it at 16-23 % at n = 300. With the step
column it is 8, 6.5, 6.5 and 6 % (seed 5), 5.5, 6, 6 and 4 % (seed 6) and
4.5, 5, 5 and 7 % (chapter 05's default run, seed 0); the other sizes stay
within Monte Carlo error and the Monte Carlo takes 14 % longer. A step
whose place moves with a categorical control was held out of that choice
(``bench/unseen_nulls.py``): it went through 20, 42.5 and 82.5 % of the
time at n = 150, 300 and 1000, and 8.5, 11 and 6.5 % once every level got
its own cut (:func:`_level_steps`). A step whose place moves with another
numeric control (``diagonal_step`` of ``bench/unseen_nulls.py``: the edge
of divergence, a step in the learning rate that moves with the width) was
held out too: the smoother put a ramp across the slanted edge, the test
rejected it 48, 67 and 100 % of the time at n = 150, 300 and 1000 (100
repetitions, seed 21), and the audit claimed it in 15-19 % of ledgers at
every n. The target's fit with interactions now has one more column, a
step along the best slanted line of two numeric ranks
(:func:`_oblique_step`, cut on the target's training rows like the other
steps, beside its single index and solved with it): 23, 19 and 26 %, and
the audit claims it in 2, 2, 1 and 0 % of ledgers at n = 60, 150, 300 and
1000 (the neighbour check withholds most of what the test still rejects).
It enters the target's fit only: in the shared basis, where the metrics'
fits carry the same misplaced edge, it gave 27, 29 and 41 %. Ranks are not
the controls, so a line in the controls is a slightly bent one in their
ranks, and the rows nearest the edge stay misfitted (with the true edge as
the column the statistic's bias is gone).
Every size and power of chapter 05's Monte Carlo stayed within Monte Carlo
error (seed 0, 200 repetitions); the claims on weak signals moved by at most
2 points (``bench/weak_signals.py --claims``, 100 ledgers per cell).

Near-noiseless confounding through many controls at small n is another
known weakness, and configurations repeated over seeds with a random effect
each (the clustered null) a third: its size averages 6.6, 6.1, 6.8 and
5.1 % at n = 60, 150, 300 and 1000 (12 to 200 configurations; seeds 5-7,
400 repetitions each). There GCV treats the repeats as independent rows:
at n = 300 the fits spend 44 degrees of freedom on 48 training
configurations, and the wild refit's spread of :math:`T` falls 7 % short
(1.48 against 1.58). Counting configurations instead of rows in GCV closed
that gap to 2 % but gave 7.5, 7.3, 5.5 and 5.7 % (no better); choosing the
penalty again on every wild draw gave 1.3-3.3 % at n = 300 (too
conservative); neither was kept. The placebo self-calibration of
:func:`mbe_helpers.audit.audit` checks the adjustment on a user's own data
against smooth proxies; its proxy placebos have no steps (a control with
at most :data:`LEVELS_AS_CATEGORY` levels is one-hot encoded, and any step
in it is fitted exactly).

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> b = rng.uniform(-2.5, 2.5, 400)
>>> m, y = b**2 + rng.normal(0, .2, 400), b**2 + rng.normal(0, .4, 400)
>>> basis = control_basis(numeric=b[:, None])
>>> folds = fold_ids(400, 5, seed=0)
>>> e = crossfit_residuals(basis, np.column_stack([m, y]), folds)
>>> test = gcm_test(e[:, 0], e[:, 1])
>>> abs(test.r) < 0.15, test.p > 0.01
(True, True)
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from scipy import linalg, sparse, special, stats
from scipy.interpolate import BSpline

from mbe_helpers.errors import MBEInputError

#: Below this many complete rows the audit's ``adjust="auto"`` uses the rank-linear adjustment.
MIN_ROWS = 40
#: Fewest rows (or clusters) per fold that ``adjust="auto"`` accepts for cross-fitting.
MIN_PER_FOLD = 8
#: A numeric control with at most this many distinct values is treated as categorical.
LEVELS_AS_CATEGORY = 6
_PENALTIES = np.logspace(-4, 4, 25)          # times the mean squared singular value
_INTERACTION_SCALES = (0.0, 1.7)            # see the module docstring
_HINGES = 24                                  # interior knots of a numeric control's main effect

_PAIR_KNOTS = 2                               # interior knots of each factor of a pairwise term
_SMOOTH_DEGREE = 3                            # Legendre degree of a numeric rank's smooth main effect
_SMOOTH_WEIGHT = 3.0                          # weight of the smooth block (its penalty / 9)
#: The smooth block enters the basis only with at least this many rows per column of it.
SMOOTH_ROWS_PER_COLUMN = 2.0
#: The penalty used is the one GCV picks divided by this (undersmoothing, see the module docstring).
UNDERSMOOTH = 10.0
_STEP_SCALE = 3.0                             # weight of the target's step columns
_INDEX_HINGES = 8                             # interior knots of a target's single index
_INDEX_WEIGHT = 3.0                           # weight of the single index's columns
#: How the responses under test are fitted (see the module docstring): "probit" (normal scores
#: and the probit link) or "identity" (their ranks, as the target); crossfit_residuals' default.
TESTED_LINK = "probit"
_LEVEL_STEP_ROWS = 40                         # fewest training rows of a level for its own step
_OBLIQUE_ROWS = 40                            # fewest distinct training rows for an oblique step


def column_ranks(values: np.ndarray) -> np.ndarray:
    r"""Average ranks 1..n of each column of ``values`` (n,) or (n, R), ties sharing their mean.

    The same numbers as ``scipy.stats.rankdata(values, axis=0)`` (which it falls
    back to with NaN), 3x faster on the audit's 680 x 401 placebo block: one
    unstable sort per column (a tie's rank does not depend on the order within
    it), and the tie groups' first and last positions by running extrema,
    :math:`\operatorname{rank} = (\text{first} + \text{last}) / 2`.

    Examples
    --------
    >>> column_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist()
    [3.5, 1.0, 3.5, 2.0]
    """
    values = np.asarray(values, dtype=float)
    if values.ndim == 1:
        return column_ranks(values[:, None])[:, 0]
    if values.size == 0 or np.isnan(values).any():
        return stats.rankdata(values, axis=0)
    columns = np.ascontiguousarray(values.T)                 # sort along contiguous rows
    order = np.argsort(columns, axis=1)
    ordered = np.take_along_axis(columns, order, axis=1)
    starts = np.ones(ordered.shape, dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    position = np.arange(1.0, len(values) + 1)
    if starts.all():
        ranked = np.broadcast_to(position, ordered.shape)
    else:
        ends = np.ones(ordered.shape, dtype=bool)
        ends[:, :-1] = starts[:, 1:]
        first = np.maximum.accumulate(np.where(starts, position, 0.0), axis=1)
        last = np.minimum.accumulate(np.where(ends, position, np.inf)[:, ::-1], axis=1)[:, ::-1]
        ranked = (first + last) / 2
    out = np.empty_like(columns)
    np.put_along_axis(out, order, ranked, axis=1)
    return out.T


@dataclass(frozen=True)
class ControlBasis:
    """The learner's features: main-effect columns and pairwise-interaction columns.

    Examples
    --------
    >>> import numpy as np
    >>> basis = control_basis(numeric=np.arange(100.0).reshape(50, 2))
    >>> basis.n, basis.main.shape[0] == basis.interactions.shape[0] == 50
    (50, True)
    """

    main: np.ndarray          # (n, p_main)
    interactions: np.ndarray  # (n, p_int)
    #: (n,) codes, equal exactly where two rows have the same controls (and so the same basis row)
    rows: np.ndarray | None = None
    #: (n, k) ranks in (0, 1] of the numeric controls with more than LEVELS_AS_CATEGORY values
    ranks: np.ndarray | None = None
    #: (n, k) codes of the controls that are one-hot encoded (categories, few-level numbers)
    levels: np.ndarray | None = None
    #: per (training rows, interaction scale, target digest): the training fold's spectrum,
    #: computed once and shared by every call on this basis (the target, the metrics and the
    #: placebos)
    spectra: dict = field(default_factory=dict, repr=False, compare=False)
    #: per (training rows, target digest): the fold's step columns (see :func:`_step_columns`)
    steps: dict = field(default_factory=dict, repr=False, compare=False)
    #: per (training rows, spectrum, weights): a kept fold fit, so that the target's fits (and
    #: their lazily built projections) are shared by every metric audited on this basis
    fits: dict = field(default_factory=dict, repr=False, compare=False)
    #: (n, p_smooth) low-order polynomial block, lightly penalised (see :func:`_smooth_blocks`);
    #: its first ``smooth_main`` columns are the numeric main effects. Empty on too few rows.
    smooth: np.ndarray | None = None
    smooth_main: int = 0
    #: rows (distinct configurations of the controls) the smooth block needs; it entered
    #: where ``smooth`` is not None
    smooth_rows: int = 0
    #: per interaction scale: the basis at that scale (see :meth:`scaled`)
    _scaled: dict = field(default_factory=dict, repr=False, compare=False)

    def scaled(self, scale: float) -> np.ndarray:
        """The basis at an interaction scale: the main effects with the smooth block's numeric
        main effects (``scale`` 0), or every column with the interaction block times ``scale``."""
        if scale not in self._scaled:
            smooth = np.empty((self.n, 0)) if self.smooth is None else _SMOOTH_WEIGHT * self.smooth
            if not scale:
                blocks = [self.main, smooth[:, :self.smooth_main]]
            else:
                blocks = [self.main, scale * self.interactions, smooth]
            self._scaled[scale] = np.hstack(blocks) if any(b.shape[1] for b in blocks[1:]) \
                else self.main
        return self._scaled[scale]

    @property
    def n(self) -> int:
        return self.main.shape[0]


def _spline_basis(u: np.ndarray, n_knots: int) -> np.ndarray:
    """Cubic B-spline basis of ``u`` in [0, 1] with ``n_knots`` equally spaced interior knots."""
    degree = 3
    inner = np.linspace(0.0, 1.0, n_knots + 2)
    knots = np.r_[[0.0] * degree, inner, [1.0] * degree]
    design = BSpline.design_matrix(np.clip(u, 0.0, 1.0), knots, degree).toarray()
    return design[:, 1:]                      # drop one column: they sum to one


def _hinge_basis(u: np.ndarray) -> np.ndarray:
    r"""Linear term and hinges :math:`(u - \kappa)_+` at equally spaced knots (kinks and near-steps)."""
    cuts = np.linspace(0.0, 1.0, _HINGES + 2)[1:-1]
    return np.column_stack([u, 3.0 * np.maximum(u[:, None] - cuts, 0.0)])


def _onehot(values: np.ndarray) -> np.ndarray:
    codes, levels = pd.factorize(values, sort=True)
    return np.eye(len(levels))[codes][:, 1:]


def _tensor(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise tensor product of two feature blocks (n, p) and (n, q): every column of ``a``
    times every column of ``b``, (n, p q)."""
    return (a[:, :, None] * b[:, None, :]).reshape(len(a), -1)


def _legendre(u: np.ndarray, degree: int) -> np.ndarray:
    r"""Legendre polynomials :math:`\sqrt{2k+1}\,P_k(2u - 1)`, k = 1..degree, of ranks ``u`` in
    (0, 1]: orthogonal with unit variance under a uniform ``u``."""
    t = 2 * u - 1
    polys = [t, (3 * t**2 - 1) / 2, (5 * t**3 - 3 * t) / 2][:degree]
    return np.column_stack([p * np.sqrt(2 * k + 3) for k, p in enumerate(polys)])


def _smooth_blocks(ranks: list, dummies: list, n: int) -> tuple[np.ndarray | None, int, int]:
    r"""The smooth block: cubic Legendre main effects of every numeric rank, then the one-hot
    columns, then the products of a rank's linear Legendre term with a category's one-hot
    columns and of two categories' one-hot columns (the product of two ranks is already in
    the interactions, more lightly penalised still). Returns ``(block, numeric main columns,
    rows it needs)``, or ``(None, 0, rows it needs)`` when there are fewer than
    :data:`SMOOTH_ROWS_PER_COLUMN` rows per column.

    Examples
    --------
    >>> u = np.arange(1, 61) / 60
    >>> level = np.eye(2)[np.arange(60) % 2][:, 1:]        # a category's one-hot column
    >>> block, main, _ = _smooth_blocks([u, u[::-1]], [level], 60)
    >>> block.shape, main                                  # 6 + 1 + 2 rank x level products
    ((60, 9), 6)
    >>> _smooth_blocks([u] * 11, [], 60)[::2]              # 33 columns: 66 rows needed
    (None, 66)
    """
    main = [_legendre(u, _SMOOTH_DEGREE) for u in ranks]
    low = [_legendre(u, 1) for u in ranks] + list(dummies)
    pairs = [_tensor(a, low[j]) for i, a in enumerate(low)
             for j in range(max(i + 1, len(ranks)), len(low))]
    blocks = main + list(dummies) + pairs
    width = sum(b.shape[1] for b in blocks)
    needs = int(np.ceil(SMOOTH_ROWS_PER_COLUMN * width))
    if not width or n < needs:
        return None, 0, needs
    return np.hstack(blocks), sum(b.shape[1] for b in main), needs


def _three_way_block(centred: list, dummies: list, n: int, smooth_rows: int) -> list:
    r"""Three-way products of the linear terms: every triple of centred numeric ranks and every
    pair of them times each one-hot column (a learning-rate x weight-decay interaction whose
    sign flips with the optimizer). They join the interaction block only where the rows
    suffice for them and the smooth block together (:data:`SMOOTH_ROWS_PER_COLUMN` per
    column), so they do not move the configurations that the smooth block needs.

    Without them a product of three controls shared by the metric and the target passed as
    information in nearly every ledger (``bench/unseen_nulls.py --claims``, 100 ledgers at
    n = 60 / 150 / 300 / 1000: ``three_way`` 84 / 100 / 100 / 100, ``three_way_cat`` 82 / 97 /
    99 / 100); with them in 0-4.

    Examples
    --------
    >>> u = [np.linspace(-1, 1, 100)] * 3
    >>> sum(b.shape[1] for b in _three_way_block(u, [np.ones((100, 2))], 100, 20))  # 1 + 3 x 2
    7
    >>> _three_way_block(u, [], 21, 20)                    # 21 rows: 20 + 2 needed
    []
    """
    triples = [(a * b * c)[:, None] for i, a in enumerate(centred)
               for j, b in enumerate(centred[i + 1:], i + 1) for c in centred[j + 1:]]
    pairs = [(a * b)[:, None] for i, a in enumerate(centred) for b in centred[i + 1:]]
    modulated = [pair * block for pair in pairs for block in dummies]
    width = len(triples) + sum(b.shape[1] for b in modulated)
    if not width or n < smooth_rows + SMOOTH_ROWS_PER_COLUMN * width:
        return []
    return triples + modulated


def control_basis(numeric: np.ndarray | None = None,
                  categorical: np.ndarray | None = None, n: int | None = None) -> ControlBasis:
    r"""Basis of the controls used by the cross-fitted learner.

    Parameters
    ----------
    numeric : (n, k_num) array, optional
        Numeric controls, raw values (they are ranked here).
    categorical : (n, k_cat) array, optional
        Categorical controls, any hashable values.
    n : int, optional
        Number of rows (needed only when there are no controls).

    Returns
    -------
    ControlBasis
        ``main``: one-hot columns of a category (or of a numeric control with
        few levels), a linear term and 24 hinges of a numeric rank;
        ``interactions``: tensor products of every pair of controls'
        low-order features.

    Examples
    --------
    >>> import numpy as np
    >>> basis = control_basis(numeric=np.arange(100.0)[:, None])
    >>> basis.main.shape, basis.interactions.shape
    ((100, 25), (100, 0))
    """
    columns = [] if numeric is None else [np.asarray(c) for c in np.asarray(numeric, dtype=float).T]
    columns += [] if categorical is None else [np.asarray(c) for c in np.asarray(categorical, dtype=object).T]
    if not columns and not n:
        raise MBEInputError("control_basis needs controls or, without any, the number of rows n")
    if len({len(c) for c in columns}) > 1:
        raise MBEInputError("numeric and categorical controls have different numbers of rows; "
                            "give one value per run in each")
    if numeric is not None and not np.isfinite(np.asarray(numeric, dtype=float)).all():
        raise MBEInputError("numeric controls contain NaN or infinite values; drop those rows first")
    n = len(columns[0]) if columns else int(n)
    main, low, kinds, all_dummies, ranks = [], [], [], [], []
    for index, column in enumerate(columns):
        is_numeric = numeric is not None and index < np.shape(numeric)[1]
        kinds.append(is_numeric and len(np.unique(column)) > LEVELS_AS_CATEGORY)
        if kinds[-1]:
            u = stats.rankdata(column) / n
            ranks.append(u)
            main.append(_hinge_basis(u))
            low.append(_spline_basis(u, _PAIR_KNOTS))
        else:
            dummies = _onehot(column)
            main.append(dummies)
            low.append(dummies)
            all_dummies.append(dummies)
    pairs = [_tensor(a, b) for i, a in enumerate(low) for b in low[i + 1:]]
    centred = [np.sqrt(12.0) * (u - 0.5) for u in ranks]
    pairs += [3.0 * (a * b)[:, None] for i, a in enumerate(centred) for b in centred[i + 1:]]
    empty = np.empty((n, 0))
    codes = [pd.factorize(c)[0] for c in columns]
    one_hot = [code for code, wide in zip(codes, kinds) if not wide]
    rows = (np.unique(np.column_stack(codes), axis=0, return_inverse=True)[1].ravel()
            if codes else np.zeros(n, dtype=int))
    smooth, smooth_main, smooth_rows = _smooth_blocks(ranks, all_dummies, n)
    pairs += _three_way_block(centred, all_dummies, n, smooth_rows)
    return ControlBasis(main=np.hstack(main) if main else empty,
                        interactions=np.hstack(pairs) if pairs else empty, rows=rows,
                        ranks=np.column_stack(ranks) if ranks else empty,
                        levels=np.column_stack(one_hot) if one_hot else np.empty((n, 0), dtype=int),
                        smooth=smooth, smooth_main=smooth_main, smooth_rows=smooth_rows)


def fold_ids(n: int, folds: int, seed: int = 0, clusters: np.ndarray | None = None) -> np.ndarray:
    """Fold number of each row; whole clusters stay in one fold.

    Examples
    --------
    >>> fold_ids(6, 3, seed=1, clusters=np.array([0, 0, 1, 1, 2, 2]))[::2].tolist()
    [0, 1, 2]
    """
    units = n if clusters is None else len(pd.unique(np.asarray(clusters)))
    if clusters is not None and len(clusters) != n:
        raise MBEInputError(f"clusters has {len(clusters)} entries for {n} rows; give one per row")
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or not 2 <= folds <= units:
        raise MBEInputError(f"folds must be an integer from 2 to the {units} rows (or clusters), "
                            f"got {folds!r}")
    rng = np.random.default_rng(seed)
    if clusters is None:
        return rng.permutation(np.arange(n) % folds)
    codes = pd.factorize(clusters)[0]
    order = rng.permutation(codes.max() + 1)
    fold_of_cluster = np.empty_like(order)
    fold_of_cluster[order] = np.arange(len(order)) % folds
    return fold_of_cluster[codes]


def _eigh(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of a symmetric matrix by LAPACK's divide and conquer (``evd``: 1.15x the
    MRRR driver ``evr`` on an 8-control basis at n = 1000)."""
    return linalg.eigh(gram, driver="evd", check_finite=False)


@dataclass(frozen=True)
class _Spectrum:
    r"""Thin SVD :math:`X = U D V^\top` of a fold's centred training basis, with
    :math:`U = L R` kept as two factors (``right`` None: :math:`U = L`), and
    the test rows in :math:`V`."""

    mean: np.ndarray          # (p,) the training rows' mean of the basis
    left: np.ndarray | None   # (n_train, q) or, with ``pool``, (m, q); None without columns
    right: np.ndarray | None  # (q, r)
    d: np.ndarray | None      # (r,)
    test_v: np.ndarray | None  # (n_test, r)
    #: (m, n_train) sparse indicator :math:`E^\top` of the training rows' distinct rows, when
    #: ``left`` holds one row per distinct row (:math:`L = E L_u`); None when it holds every row
    pool: sparse.csr_matrix | None = None

    def project(self, y: np.ndarray) -> np.ndarray:
        r""":math:`U^\top y` for training columns ``y`` (n_train, R); with ``pool``,
        :math:`L_u^\top (E^\top y)`: sums per distinct row, then an m-row product."""
        a = self.left.T @ (y if self.pool is None else self.pool @ y)
        return a if self.right is None else self.right.T @ a

    def expand(self, w: np.ndarray) -> np.ndarray:
        r""":math:`U w` over the training rows for ``w`` (r, k): the transpose of :meth:`project`."""
        small = self.left @ (w if self.right is None else self.right @ w)
        return small if self.pool is None else self.pool.T @ small


def _spectrum(x: np.ndarray, test: np.ndarray) -> tuple:
    r"""``(left, right, d, test_v)`` of the centred training basis ``x`` (see :class:`_Spectrum`).

    From the eigendecomposition of the smaller Gram matrix: :math:`X^\top X =
    V D^2 V^\top` (then :math:`U = X \cdot V D^{-1}`, kept as those two
    factors) for a tall basis, :math:`X X^\top = U D^2 U^\top` (then the test
    rows :math:`X_t V = X_t X^\top U D^{-1}`) for a wide one; both are 2-3
    times faster than the SVD, and directions below :math:`10^{-6} d_1` are
    dropped (the ridge shrinks them away in any case).
    """
    if x.shape[1] > x.shape[0]:
        eigenvalues, u = _eigh(x @ x.T)
        eigenvalues, u = eigenvalues[::-1], u[:, ::-1]
        keep = eigenvalues > max(eigenvalues[0], 0) * 1e-12
        u, d = u[:, keep], np.sqrt(eigenvalues[keep])
        return u, None, d, ((test @ x.T) @ u) / d
    eigenvalues, v = _eigh(x.T @ x)                         # 2-3x faster than the SVD of x
    eigenvalues, v = eigenvalues[::-1], v[:, ::-1]
    keep = eigenvalues > max(eigenvalues[0], 0) * 1e-12
    v, d = v[:, keep], np.sqrt(eigenvalues[keep])
    return x, v / d, d, test @ v


def _distinct_spectrum(x: np.ndarray, mean: np.ndarray, test: np.ndarray,
                       rows: np.ndarray | None) -> tuple:
    r""":func:`_spectrum` of the training rows ``x`` centred at ``mean``, computed on their
    distinct rows (a grid repeats each configuration over seeds), and the indicator
    :math:`E^\top` (None without repeats; see :attr:`_Spectrum.pool`).

    With :math:`m` distinct rows :math:`X_u`, counts :math:`C` and the
    indicator :math:`E` (``x`` :math:`= E X_u`), :math:`Z = C^{1/2} X_u` has
    :math:`Z^\top Z = X^\top X`; from :math:`Z = U_z D V^\top` follows
    :math:`X = (E C^{-1/2} U_z) D V^\top` with orthonormal :math:`E C^{-1/2}
    U_z`: the same thin SVD from an :math:`m`-row problem, kept as :math:`C^{-1/2} U_z`
    and :math:`E^\top`.
    """
    distinct = _distinct_rows(rows, most=0.8)
    if distinct is None:
        x -= mean                                          # the caller's copy: centred in place
        test -= mean
        return (*_spectrum(x, test), None)
    first, inverse, counts = distinct
    root = np.sqrt(counts)[:, None]
    left, right, d, test_v = _spectrum((x[first] - mean) * root, test - mean)
    return left / root, right, d, test_v, _indicator(inverse, len(first))


def _distinct_rows(rows: np.ndarray | None, most: float):
    """``(first, inverse, counts)`` of the distinct codes in ``rows``, or None when there are
    none or more than ``most`` of them per row (too few repeats to be worth factorising).

    Examples
    --------
    >>> [a.tolist() for a in _distinct_rows(np.array([4, 2, 4, 4]), most=0.5)]
    [[1, 0], [1, 0, 1, 1], [1, 3]]
    >>> _distinct_rows(np.array([4, 2, 3]), most=0.5) is None
    True
    """
    if rows is None:
        return None
    _, first, inverse, counts = np.unique(rows, return_index=True, return_inverse=True,
                                          return_counts=True)
    return (first, inverse.ravel(), counts) if len(first) <= most * len(rows) else None


def _step_cuts(ranks: np.ndarray, y: np.ndarray) -> np.ndarray:
    r"""Per column of ``ranks`` (m, k), the cut :math:`\kappa` where ``y`` (m,) jumps most.

    Sorted by the control, the rows' running means over :math:`w =
    \max(8, \lfloor\sqrt m\rfloor)` rows on either side of each gap
    between distinct values are compared; the gap with the largest
    :math:`|\bar y_{\text{right}} - \bar y_{\text{left}}|` gives
    :math:`\kappa`, the midpoint of the gap. A smooth response jumps by its
    slope times the window; a step by its height.

    Examples
    --------
    >>> import numpy as np
    >>> u = np.arange(1, 201) / 200
    >>> y = (u > 0.6) + 0.5 * u + np.random.default_rng(0).normal(0, 0.3, 200)
    >>> _step_cuts(u[:, None], y).round(4).tolist()
    [0.6025]
    """
    m, k = ranks.shape
    window = max(8, int(np.sqrt(m)))
    order = np.argsort(ranks, axis=0, kind="stable")                   # every column at once
    sorted_u = np.take_along_axis(ranks, order, axis=0)
    sums = np.vstack([np.zeros((1, k)), np.cumsum(y[order], axis=0)])
    gap = np.arange(window, m - window + 1)               # rows gap-w..gap-1 | gap..gap+w-1
    if not len(gap):
        best = np.full(k, m // 2)
    else:
        jump = np.abs(sums[gap + window] - 2 * sums[gap] + sums[gap - window])
        jump[sorted_u[gap - 1] >= sorted_u[np.minimum(gap, m - 1)]] = -1.0   # ties: no gap
        best = gap[np.argmax(jump, axis=0)]
    columns = np.arange(k)
    return 0.5 * (sorted_u[best - 1, columns] + sorted_u[np.minimum(best, m - 1), columns])


def _stump_cuts(values: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""Per column of ``values`` (m, k), the least-squares stump of ``y`` (m,): the cut
    :math:`\kappa` and its gain :math:`S_L^2 / m_L + S_R^2 / m_R` (sums of the centred ``y``
    on either side; the gain is the fall in the residual sum of squares). Cuts leave at least
    :math:`\max(8, \lfloor\sqrt m\rfloor)` rows on each side and never split tied values;
    a column without such a cut gets gain -1.

    Examples
    --------
    >>> import numpy as np
    >>> u = np.arange(1, 201) / 200
    >>> y = (u > 0.6) + np.random.default_rng(0).normal(0, 0.3, 200)
    >>> cut, gain = _stump_cuts(np.column_stack([u, u[::-1]]), y)
    >>> cut.round(4).tolist(), bool(gain[0] > 10)
    ([0.6025, 0.4025], True)
    """
    m, k = values.shape
    rows = np.ascontiguousarray(values.T)                             # (k, m): one sort per row
    order = np.argsort(rows, axis=1)                  # tied rows' order moves no valid cut's sums
    ordered = np.take_along_axis(rows, order, axis=1)
    left = np.cumsum((y - y.mean())[order], axis=1)[:, :-1]     # S_L after each of rows 1..m-1
    size = np.arange(1, m)
    gain = left**2 * (1.0 / size + 1.0 / (m - size))                  # S_R = -S_L
    low = max(8, int(np.sqrt(m)))
    gain[:, :low - 1], gain[:, m - low:] = -1.0, -1.0
    gain[ordered[:, :-1] >= ordered[:, 1:]] = -1.0
    best, columns = np.argmax(gain, axis=1), np.arange(k)
    return 0.5 * (ordered[columns, best] + ordered[columns, best + 1]), gain[columns, best]


def _oblique_step(basis: ControlBasis, train: np.ndarray, y: np.ndarray) -> np.ndarray:
    r"""A target's step along a slanted line of two numeric ranks: ``(n, 1)``, or ``(n, 0)``
    with fewer than two numeric ranks or :data:`_OBLIQUE_ROWS` distinct training rows.

    Pairs of centred ranks :math:`(u_i, u_j)` are projected on directions
    :math:`s = u_i \cos\theta + u_j \sin\theta` every 15 degrees (the axes
    excluded: :func:`_step_cuts` has them), and each projection gets the
    least-squares stump of ``y`` on the training rows (:func:`_stump_cuts`);
    with more than three numeric ranks only the pairs among the three whose
    own stumps gain most are tried. The best angle is refined three times (9
    angles across the previous spacing each time, down to a quarter of a
    degree), and the column is :math:`1\{s > \kappa\}`: a step in the
    learning rate whose place moves with the width (the edge of divergence)
    is one column. Unweighted, it is penalised 9 times more than the index's
    columns (:data:`_INDEX_WEIGHT`): a sharp edge keeps its height, a smooth
    target gains little from it (weighted like the index, it cost 6 and 5
    points of the claims on ``weak_four`` of ``bench/weak_signals.py`` at n =
    60 and 150, 36 -> 30 and 90 -> 85 %; unweighted 2 and 1).

    Examples
    --------
    >>> import numpy as np
    >>> lr, width = np.random.default_rng(0).uniform(size=(2, 400))
    >>> edge = lr > 0.2 + 0.6 * width
    >>> step = _oblique_step(control_basis(np.column_stack([lr, width])), np.ones(400, bool), 1.0 * edge)
    >>> step.shape, float(np.mean((step[:, 0] > 0) != edge))   # on the slanted edge's other side
    ((400, 1), 0.99)
    """
    ranks = basis.ranks
    distinct = len(np.unique(basis.rows[train])) if basis.rows is not None else int(train.sum())
    if ranks is None or ranks.shape[1] < 2 or distinct < _OBLIQUE_ROWS:
        return np.empty((basis.n, 0))
    centred, target = ranks - 0.5, y[train]
    trained = centred[train]
    chosen = np.arange(ranks.shape[1])
    if len(chosen) > 3:
        chosen = np.sort(np.argsort(-_stump_cuts(trained, target)[1])[:3])
    first, second = (chosen[side] for side in np.triu_indices(len(chosen), 1))
    spacing = np.pi / 12
    coarse = np.delete(np.arange(1, 12), 5) * spacing                       # 15, 30, ... 165 degrees
    i, j = np.repeat(first, len(coarse)), np.repeat(second, len(coarse))
    angle = np.tile(coarse, len(first))
    _, gain = _stump_cuts(np.cos(angle) * trained[:, i] + np.sin(angle) * trained[:, j], target)
    best = int(np.argmax(gain))
    i, j, theta = i[best], j[best], angle[best]
    for _ in range(3):
        angles = theta + np.linspace(-spacing, spacing, 9)
        projected = np.cos(angles) * centred[:, [i]] + np.sin(angles) * centred[:, [j]]
        cuts, gain = _stump_cuts(projected[train], target)
        best = int(np.argmax(gain))
        theta, spacing = angles[best], spacing / 4
    return (projected[:, [best]] > cuts[best]).astype(float)


def _level_steps(basis: ControlBasis, train: np.ndarray, y: np.ndarray) -> np.ndarray:
    r"""Step columns :math:`1\{c = \ell\}\,(u > \kappa_\ell)` per level :math:`\ell` of each
    one-hot control :math:`c` and numeric rank :math:`u`, cut where ``y`` (n,) jumps most on
    the training rows of that level (:func:`_step_cuts`; levels with fewer than
    :data:`_LEVEL_STEP_ROWS` training rows get none): a step whose place moves with the
    optimizer.

    Examples
    --------
    >>> import numpy as np
    >>> u = np.arange(1, 201) / 200
    >>> arch = np.arange(200) % 2
    >>> y = (u > np.where(arch == 0, 0.3, 0.7)).astype(float)
    >>> basis = control_basis(u[:, None], arch[:, None])
    >>> steps = _level_steps(basis, np.ones(200, bool), y)
    >>> steps.shape, [float(u[(arch == level) & (steps[:, level] > 0)].min()) for level in (0, 1)]
    ((200, 2), [0.305, 0.71])
    """
    columns = []
    for codes in basis.levels.T:
        for level in np.unique(codes):
            inside = codes == level
            rows = train & inside
            if rows.sum() >= _LEVEL_STEP_ROWS:
                cut = _step_cuts(basis.ranks[rows], y[rows])
                columns.append(inside[:, None] * (basis.ranks > cut))
    return np.hstack(columns) if columns else np.empty((basis.n, 0))


def _step_columns(basis: ControlBasis, train: np.ndarray, y: np.ndarray) -> bytes:
    r"""The digest of the target's training values ``y[train]`` under which the fold's step
    columns are cached in ``basis.steps``: :math:`3\,(u > \kappa)` per numeric rank
    (:func:`_step_cuts`), then the per-level steps (:func:`_level_steps`). They are built once
    per fold and target, and shared by the metrics' and the placebos' passes."""
    digest = hashlib.blake2b(y[train].tobytes()).digest()
    key = (train.tobytes(), digest)
    if key not in basis.steps:
        columns = [basis.ranks > _step_cuts(basis.ranks[train], y[train])]
        if basis.levels.shape[1]:
            columns.append(_level_steps(basis, train, y))
        basis.steps[key] = _STEP_SCALE * np.hstack(columns)
    return digest


def _fold_spectrum(basis: ControlBasis, train: np.ndarray, test: np.ndarray, scale: float,
                   steps: bytes | None = None):
    r"""The :class:`_Spectrum` of the centred training basis at this interaction scale, with the
    fold's step columns cached under the digest ``steps`` (:func:`_step_columns`) when given;
    cached."""
    key = (train.tobytes(), scale, steps)
    if key not in basis.spectra:
        blocks = [basis.scaled(scale)]
        if steps is not None:
            blocks.append(basis.steps[train.tobytes(), steps])
        x_train = np.hstack([block[train] for block in blocks])  # no copy of the whole basis
        mean_x = x_train.mean(axis=0)
        if x_train.shape[1] == 0:
            basis.spectra[key] = _Spectrum(mean_x, None, None, None, None)
        else:
            rows = None if basis.rows is None else basis.rows[train]
            x_test = np.hstack([block[test] for block in blocks])
            spectrum = _Spectrum(mean_x, *_distinct_spectrum(x_train, mean_x, x_test, rows))
            if not spectrum.d.size:                      # the basis is constant on these rows
                spectrum = _Spectrum(mean_x, None, None, None, None)
            basis.spectra[key] = spectrum
    return basis.spectra[key]


def _ridge_gcv_predict(spectrum, mean_y: np.ndarray, yc: np.ndarray, total: np.ndarray,
                       n_test: int):
    """Out-of-fold predictions of every training column (n_train, R) by ridge tuned by GCV.

    ``spectrum`` is :func:`_fold_spectrum`'s; the columns come centred, ``yc``,
    with their means ``mean_y`` and sums of squares ``total`` (R,), computed
    once per fold for every interaction scale. Returns ``(test_predictions
    (n_test, R), gcv_scores (R,), fit)``; ``fit`` predicts new response
    columns with the same penalties (see :func:`refit_residuals`).
    """
    d, test_v = spectrum.d, spectrum.test_v
    n = len(yc)
    if d is None:
        return (np.broadcast_to(mean_y, (n_test, yc.shape[1])).copy(), total / n,
                (None, np.zeros((yc.shape[1], 0)), spectrum, np.ones(yc.shape[1])))
    a = spectrum.project(yc)                                 # (r, R)
    lam = _PENALTIES[:, None] * np.mean(d**2)                # (L, 1)
    shrink = d**2 / (d**2 + lam)                             # (L, r)
    rss = total - (2 * shrink - shrink**2) @ a**2            # (L, R)
    dof = shrink.sum(axis=1, keepdims=True) + 1.0
    gcv = n * np.maximum(rss, 0) / np.maximum(n - dof, 0.5) ** 2
    best = np.argmin(gcv, axis=0)                            # (R,)
    used = lam[best] / UNDERSMOOTH                           # (R, 1)
    weights = d / (d**2 + used)                              # (R, r)
    prediction = test_v @ (weights.T * a) + mean_y
    fitted_dof = (d**2 / (d**2 + used)).sum(axis=1) + 1.0
    return prediction, gcv[best, np.arange(yc.shape[1])], (test_v, weights, spectrum, fitted_dof)


def _index_design(basis: ControlBasis) -> np.ndarray | None:
    """The features of a target's single index: the smooth block and the bilinear product of
    every two numeric ranks; None where the smooth block has too few rows to enter."""
    if basis.smooth is None:
        return None
    ranks = np.empty((basis.n, 0)) if basis.ranks is None else basis.ranks - 0.5
    k = ranks.shape[1]
    pairs = [ranks[:, [i]] * ranks[:, [j]] for i in range(k) for j in range(i + 1, k)]
    return np.hstack([basis.smooth, *pairs])


def _single_index(design: np.ndarray, train: np.ndarray, y: np.ndarray,
                  shared: "_Spectrum | None" = None) -> np.ndarray:
    r"""Columns of a target's single index on one fold: ``(n, 1 + 8)``.

    The index :math:`\hat s = D\hat\beta` is the ridge fit (penalty chosen by
    GCV, then divided by :data:`UNDERSMOOTH`) of the target's normal scores
    :math:`\Phi^{-1}(\operatorname{rank}/(n + 1))` on the training rows of
    ``design`` (:func:`_index_design`); its columns are the rank :math:`u` of
    :math:`\hat s` among the training rows and 8 hinges :math:`3\,(u -
    \kappa)_+`, times :data:`_INDEX_WEIGHT`. A response that is a monotone
    function of a smooth index of the controls (an accuracy of a training
    grid's skill) is then one smooth function of one column. ``shared`` is
    :func:`_index_spectrum` of the fold (computed here when not given).

    Examples
    --------
    >>> import numpy as np
    >>> u = np.arange(1, 101) / 100
    >>> basis = control_basis(np.column_stack([u, u[::-1] ** 2]))
    >>> _single_index(_index_design(basis), np.arange(100) >= 20, np.exp(u)).shape
    (100, 9)
    """
    spectrum = shared or _index_spectrum(design, train)
    n_train = int(train.sum())
    if spectrum.d is None:                              # the design is constant on these rows
        return np.zeros((len(design), 1 + _INDEX_HINGES))
    z = special.ndtri(column_ranks(y[train]) / (n_train + 1))[:, None]
    zc = z - z.mean()
    index = _ridge_gcv_predict(spectrum, z.mean(axis=0), zc, (zc**2).sum(axis=0), len(design))[0]
    u = np.searchsorted(np.sort(index[train, 0]), index[:, 0], side="right") / n_train
    cuts = np.linspace(0.0, 1.0, _INDEX_HINGES + 2)[1:-1]
    return _INDEX_WEIGHT * np.column_stack([u, 3.0 * np.maximum(u[:, None] - cuts, 0.0)])


def _index_spectrum(design: np.ndarray, train: np.ndarray) -> _Spectrum:
    """The :class:`_Spectrum` of the index design's training rows, with every row as a test
    row: the part of :func:`_single_index` that every target of a fold shares."""
    mean = design[train].mean(axis=0)
    left, right, d, test_v = _spectrum(design[train] - mean, design - mean)
    return _Spectrum(mean, left, right, d, test_v) if d.size else _Spectrum(mean, *[None] * 4)


def _index_ridge(spectrum, columns: np.ndarray, test: np.ndarray, train: np.ndarray,
                 mean_y: float, yc: np.ndarray, total: float, rows: np.ndarray | None):
    r"""Ridge of one centred training response ``yc`` on the fold's basis :math:`X` and the
    index columns :math:`Z` (``columns``, (n, q)) under one penalty tuned by GCV, solved
    through :math:`X`'s spectrum (no factorisation of :math:`[X, Z]`).

    With :math:`A = X X^\top + \lambda I` known from :math:`X = U D V^\top`,
    Woodbury gives :math:`(A + Z Z^\top)^{-1} = A^{-1} - A^{-1} Z M^{-1}
    Z^\top A^{-1}`, :math:`M = I_q + Z^\top A^{-1} Z`: every penalty costs
    q x q solves. The residual is :math:`\lambda (A + ZZ^\top)^{-1} y` and the
    fit's df :math:`n - \lambda \operatorname{tr}(A + ZZ^\top)^{-1}`.

    Returns ``(test predictions, GCV score, df, fold fit)``; the fit is an
    :class:`_IndexFoldFit` for the wild refits.
    """
    n, d = len(yc), spectrum.d
    z_mean = columns[train].mean(axis=0)
    z, z_test = columns[train] - z_mean, columns[test] - z_mean
    a, b = spectrum.project(yc[:, None])[:, 0], spectrum.project(z)     # (r,), (r, q)
    zz, zy = z.T @ z, z.T @ yc
    outside = zz - b.T @ b                                              # Z^T (I - UU^T) Z
    lam = _PENALTIES * np.mean(d**2)                                    # (L,)
    s = 1.0 / (d**2 + lam[:, None])                                     # (L, r)
    m = np.eye(z.shape[1]) + (b.T * s[:, None, :]) @ b + outside / lam[:, None, None]
    inverse = np.linalg.inv(m)                                          # (L, q, q)
    c = (inverse @ ((s * a) @ b + (zy - b.T @ a) / lam[:, None])[..., None])[..., 0]
    u_w = a - c @ b.T                                                   # U^T (y - Z c)
    w_w = total - 2 * c @ zy + ((c @ zz) * c).sum(axis=1)               # |y - Z c|^2
    rss = lam**2 * (u_w**2 * s**2).sum(axis=1) + w_w - (u_w**2).sum(axis=1)
    inside = (b.T * (s**2)[:, None, :]) @ b + outside / lam[:, None, None] ** 2
    trace = (s.sum(axis=1) + (n - len(d)) / lam
             - (inverse * inside.transpose(0, 2, 1)).sum(axis=(1, 2)))   # tr(M^-1 Z'A^-2 Z)
    dof = n - lam * trace + 1.0
    gcv = n * np.maximum(rss, 0) / np.maximum(n - dof, 0.5) ** 2
    best = int(np.argmin(gcv))
    used = lam[best] / UNDERSMOOTH
    s_u = 1.0 / (d**2 + used)
    m_u = np.eye(z.shape[1]) + (b.T * s_u) @ b + outside / used
    c_u = np.linalg.solve(m_u, (s_u * a) @ b + (zy - b.T @ a) / used)
    u_w = a - b @ c_u
    z_v = b.T @ (s_u * u_w) + (zy - zz @ c_u - b.T @ u_w) / used        # Z^T (A + ZZ^T)^{-1} y
    prediction = mean_y + spectrum.test_v @ (d * s_u * u_w) + z_test @ z_v
    inside_u = (b.T * s_u**2) @ b + outside / used**2
    trace_used = s_u.sum() + (n - len(d)) / used - np.trace(np.linalg.solve(m_u, inside_u))
    fit = _IndexFoldFit(_FoldFit(test, train, spectrum, d * s_u, rows), z, z_test, b, m_u, used)
    return prediction, gcv[best], n - used * trace_used + 1.0, fit


def crossfit_residuals(basis: ControlBasis, responses: np.ndarray, folds: np.ndarray,
                       keep: int | list[int] | None = None, anchor: int | None = 0,
                       link: str | None = None):
    r"""Out-of-fold residuals of the ranked responses given the controls.

    Each column of ``responses`` is ranked and scaled to (0, 1]; on every
    fold it is predicted from the basis by ridge regression fitted on the
    other folds, with the penalty and the scale of the interaction block
    chosen per response by GCV inside the training rows. The folds' spectra
    are cached on ``basis``, so residualising more columns later on the same
    basis and folds costs only matrix products. On every fold the basis
    also has one step column per numeric control, cut where the training
    rows of response ``anchor`` (the target) jump most (:func:`_step_cuts`),
    and one per level of each one-hot control (:func:`_level_steps`).

    Parameters
    ----------
    basis : ControlBasis
    responses : (n, R) array
    folds : (n,) int array of fold numbers
    keep : int or list of int, optional
        Also return the fits chosen for response ``keep`` (for :func:`refit_residuals`);
        for a list, one :class:`KeptFits` per listed response.
    anchor : int or None, default 0
        The response whose steps enter the basis (None: no step columns).
    link : {"probit", "identity"}, optional
        How the responses under test (all but ``anchor`` and ``keep``) are
        fitted: on normal scores with the probit link back to the rank scale,
        or on their ranks like the target (default :data:`TESTED_LINK`).

    Returns
    -------
    residuals : (n, R) array
        :math:`\operatorname{rank}(V)/n - \hat f_{-k}(B)`; for the responses under test with
        the probit link :math:`\operatorname{rank}(V)/(n+1) - \Phi(\hat m / \sqrt{1 + s^2})`.
    fits : KeptFits or list of KeptFits
        Only when ``keep`` is given: the fits of response ``keep`` (one per listed response).

    Examples
    --------
    >>> import numpy as np
    >>> b = np.linspace(0, 1, 50)
    >>> e = crossfit_residuals(control_basis(b[:, None]), np.column_stack([b**2]), np.arange(50) % 5)
    >>> float(np.abs(e).max()) < 0.05
    True
    """
    responses = np.asarray(responses, dtype=float)
    n = len(responses)
    ranked = column_ranks(responses) / n
    out = np.empty_like(ranked)
    kept = [] if keep is None else [keep] if np.ndim(keep) == 0 else list(keep)
    probit = np.full(ranked.shape[1], (link or TESTED_LINK) == "probit")
    probit[[*kept, *([] if anchor is None else [anchor])]] = False
    fitted = ranked.copy()                               # what the ridge fits: ranks or z-scores
    fitted[:, probit] = special.ndtri(ranked[:, probit] * n / (n + 1))
    operators = [[] for _ in kept]
    dof = np.zeros(ranked.shape[1])
    has_steps = anchor is not None and basis.ranks is not None and basis.ranks.shape[1] > 0
    targets = sorted({*kept, *([] if anchor is None else [anchor])})    # fitted on their ranks
    design = _index_design(basis) if targets and basis.interactions.shape[1] else None
    for fold in np.unique(folds):
        test, train = folds == fold, folds != fold
        steps = _step_columns(basis, train, ranked[:, anchor]) if has_steps else None
        best_pred, best_score, best_fits, best_dof = None, None, None, None
        values = fitted[train]
        mean_y = values.mean(axis=0)
        centred = values - mean_y
        total = (centred**2).sum(axis=0)
        for scale in _INTERACTION_SCALES:
            if scale and basis.interactions.shape[1] == 0:
                continue
            spectrum = _fold_spectrum(basis, train, test, scale, steps)
            pred, score, (_, weights, _, fold_dof) = _ridge_gcv_predict(
                spectrum, mean_y, centred, total, int(test.sum()))
            fold_dof = fold_dof.copy()
            fits = {j: _kept_fit(basis, test, train, spectrum, weights[j]) for j in kept}
            if scale and design is not None and spectrum.d is not None:   # the targets' index
                for j in targets:
                    pred[:, j], score[j], fold_dof[j], index_fit = _target_index_fit(
                        basis, spectrum, design, test, train, ranked[:, j])
                    fits[j] = index_fit
            if best_pred is None:
                best_pred, best_score, best_dof = pred, score, fold_dof
                best_fits = [fits[j] for j in kept]
            else:
                better = score < best_score
                best_pred[:, better], best_score[better] = pred[:, better], score[better]
                best_dof[better] = fold_dof[better]
                best_fits = [fits[j] if better[j] else old for j, old in zip(kept, best_fits)]
        out[test] = ranked[test] - best_pred
        if probit.any():                                 # E[Phi(z) | B] = Phi(m / sqrt(1 + s^2))
            scale = np.sqrt(1.0 + best_score[probit])
            out[np.ix_(test, probit)] = (ranked[test][:, probit] * n / (n + 1)
                                         - special.ndtr(best_pred[:, probit] / scale))
        dof += best_dof / len(np.unique(folds))
        for position, fit in enumerate(best_fits):
            operators[position].append(fit)
    if keep is None:
        return out
    fits = [KeptFits(ops, dof) for ops in operators]
    return out, (fits[0] if np.ndim(keep) == 0 else fits)


def _target_index_fit(basis: ControlBasis, spectrum, design: np.ndarray, test: np.ndarray,
                      train: np.ndarray, y: np.ndarray) -> tuple:
    """:func:`_index_ridge` of the target ``y`` (its ranks / n) with its single index on this
    fold, cached on ``basis`` under the digest of its training values: every metric audited
    against this target (and the placebos) shares the fit and its lazily built projections."""
    key = ("index", train.tobytes(), id(spectrum), hashlib.blake2b(y[train].tobytes()).digest())
    if key not in basis.fits:
        design_key = ("index spectrum", train.tobytes())
        if design_key not in basis.fits:
            basis.fits[design_key] = _index_spectrum(design, train)
        centred = y[train] - y[train].mean()
        index = np.column_stack([_single_index(design, train, y, basis.fits[design_key]),
                                 _oblique_step(basis, train, y)])
        basis.fits[key] = _index_ridge(spectrum, index, test, train, y[train].mean(), centred,
                                       centred @ centred, basis.rows)
    return basis.fits[key]


def _kept_fit(basis: ControlBasis, test: np.ndarray, train: np.ndarray, spectrum,
              weights: np.ndarray) -> "_FoldFit":
    """The fold fit of a kept response (one object per fold, spectrum and weights, cached on
    ``basis`` so that later calls share its lazily built projections)."""
    key = (train.tobytes(), id(spectrum), weights.tobytes())
    if key not in basis.fits:
        basis.fits[key] = _FoldFit(test, train, spectrum, weights, basis.rows)
    return basis.fits[key]


class _FoldFit:
    r"""One fold of a kept fit: :math:`e_{test} = v_{test} - P\,v_{train}` for any column
    :math:`v`, with the fold's fit of centred responses and the centring folded into the
    (n_test, n_train) matrix :math:`P`. Both :attr:`projection` and its form on distinct
    rows, :attr:`compact`, are built on first use: the wild refits need only the second.
    """

    def __init__(self, test: np.ndarray, train: np.ndarray, spectrum, weights: np.ndarray,
                 rows: np.ndarray | None):
        self.test, self.train = test, train
        self._spectrum, self._weights, self._rows = spectrum, weights, rows

    def _hat(self, test_rows=slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """The fit of centred training responses for these test rows, over the spectrum's own
        training columns (distinct rows when pooled), and the matrix that spreads them over
        the training rows (None: one per row)."""
        spectrum = self._spectrum
        if spectrum.d is None:
            count = np.arange(int(self.test.sum()))[test_rows].size
            return np.zeros((count, int(self.train.sum()))), None
        weighted = spectrum.test_v[test_rows] * self._weights
        fit = (weighted if spectrum.right is None else weighted @ spectrum.right.T) @ spectrum.left.T
        return fit, spectrum.pool

    @functools.cached_property
    def projection(self) -> np.ndarray:
        fit, pool = self._hat()
        hat = fit if pool is None else np.asarray(fit @ pool)
        return hat - hat.mean(axis=1, keepdims=True) + 1.0 / self.train.sum()

    @property
    def rank(self) -> int:
        """Columns of :attr:`factors` (0 without a fit)."""
        return 0 if self._spectrum.d is None else self._spectrum.d.size

    @functools.cached_property
    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        r"""``(A, B)`` with :math:`P = A B^\top + 1/n_{train}`: :math:`A = V_t \circ w`
        (n_test, r) and :math:`B = U - \bar U` (n_train, r), the training rows' centred left
        singular vectors (see :func:`_times`)."""
        spectrum = self._spectrum
        if spectrum.d is None:
            return np.zeros((int(self.test.sum()), 0)), np.zeros((int(self.train.sum()), 0))
        u = spectrum.expand(np.eye(spectrum.d.size))
        return spectrum.test_v * self._weights, u - u.mean(axis=0)

    @functools.cached_property
    def compact(self):
        r"""``(P_u, E^T, test_codes)`` with :math:`P = F P_u E^\top` when rows repeat, else None.

        Rows with the same controls have the same basis row, so :math:`P_{ij}`
        depends only on the distinct test row of :math:`i` and the distinct
        training row of :math:`j`: :math:`P v = F\,(P_u\,(E^\top v))`, with
        indicators :math:`E, F`, costs a sum per configuration and an
        :math:`m_{test} \times m_{train}` product instead of the full one.
        """
        rows, test, train = self._rows, self.test, self.train
        distinct_train = _distinct_rows(None if rows is None else rows[train], most=0.5)
        if distinct_train is None:
            return None
        first_train, train_codes, _ = distinct_train
        first_test, test_codes, _ = _distinct_rows(rows[test], most=1.0)
        fit, pool = self._hat(first_test)
        if pool is None:
            mean, small = fit.mean(axis=1, keepdims=True), fit[:, first_train]
        else:
            mean = np.asarray(fit @ pool.sum(axis=1)) / train.sum()
            small = np.asarray(fit @ pool[:, first_train].toarray())
        sums = _indicator(train_codes, len(first_train), np.flatnonzero(train),
                          len(train))                                   # E^T over all n rows
        return small - mean + 1.0 / train.sum(), sums, test_codes


class _IndexFoldFit:
    r"""A fold fit with a target's single index (:func:`_index_ridge`): the fit on the basis
    alone, :math:`P_X` (``plain``, at the penalty used), plus the Woodbury correction
    :math:`L R`, :math:`L = (Z_t - X_t X^\top A^{-1} Z) M^{-1}` (n_test, q) and :math:`R =
    Z^\top A^{-1}` (q, n_train), centred over the training rows like :math:`P_X`; built on
    first use."""

    def __init__(self, plain: _FoldFit, z: np.ndarray, z_test: np.ndarray, b: np.ndarray,
                 m: np.ndarray, penalty: float):
        self.test, self.train = plain.test, plain.train
        self._plain, self._z, self._z_test, self._b, self._m = plain, z, z_test, b, m
        self._penalty = penalty

    @functools.cached_property
    def _left(self) -> np.ndarray:
        spectrum, weights = self._plain._spectrum, self._plain._weights
        return np.linalg.solve(self._m, (self._z_test - (spectrum.test_v * weights) @ self._b).T).T

    @functools.cached_property
    def _w(self) -> np.ndarray:
        r""":math:`R = W^\top U^\top + Z^\top / \lambda` with this (r, q) :math:`W`."""
        d, lam = self._plain._spectrum.d, self._penalty
        return (1.0 / (d**2 + lam) - 1.0 / lam)[:, None] * self._b

    @functools.cached_property
    def _right(self) -> np.ndarray:
        return (self._plain._spectrum.expand(self._w) + self._z / self._penalty).T

    @functools.cached_property
    def projection(self) -> np.ndarray:
        r""":math:`P = (V_t \circ w + L W^\top) U^\top + L Z^\top / \lambda`, centred as
        :attr:`_FoldFit.projection` (one (n_test, n_train) product, as for the plain fit)."""
        spectrum = self._plain._spectrum
        weighted = spectrum.test_v * self._plain._weights + self._left @ self._w.T
        fit = (weighted if spectrum.right is None else weighted @ spectrum.right.T) @ spectrum.left.T
        if spectrum.pool is not None:
            fit = np.asarray(fit @ spectrum.pool)
        fit += (self._left / self._penalty) @ self._z.T
        return fit - fit.mean(axis=1, keepdims=True) + 1.0 / self.train.sum()

    @property
    def rank(self) -> int:
        """Columns of :attr:`factors`."""
        return self._plain.rank + self._z.shape[1]

    @functools.cached_property
    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        r""":attr:`_FoldFit.factors` of :attr:`projection`: :math:`A = [V_t \circ w + L
        W^\top,\; L / \lambda]`, :math:`B = [U, Z]` centred over the training rows."""
        a, b = self._plain.factors
        return (np.hstack([a + self._left @ self._w.T, self._left / self._penalty]),
                np.hstack([b, self._z - self._z.mean(axis=0)]))

    @functools.cached_property
    def compact(self):
        """:attr:`_FoldFit.compact` with the correction on distinct rows (repeated rows of
        the controls have equal rows of :math:`L` and equal columns of :math:`R`)."""
        plain = self._plain.compact
        if plain is None:
            return None
        small, sums, test_codes = plain
        first_test = np.unique(test_codes, return_index=True)[1]
        first_train = np.searchsorted(np.flatnonzero(self.train), sums.indices[sums.indptr[:-1]])
        left = self._left[first_test]
        correction = left @ self._right[:, first_train] - left @ self._right.mean(axis=1)[:, None]
        return small + correction, sums, test_codes


def _ridge_predictions(spectrum, centred: np.ndarray, penalties) -> np.ndarray:
    """Test-row ridge predictions of one centred training response, a column per penalty
    (each times the mean squared singular value, as everywhere in this module)."""
    a = spectrum.project(centred[:, None])[:, 0]
    lam = np.asarray(penalties, dtype=float) * np.mean(spectrum.d ** 2)
    return spectrum.test_v @ (spectrum.d / (spectrum.d ** 2 + lam) * a).T


def cv_ridge_fit(basis: ControlBasis, z: np.ndarray, folds: np.ndarray) -> tuple:
    r"""Ridge fit of ``z`` on every row, tuned by K-fold cross-validation on ``folds``.

    The penalty and the interaction scale minimise the out-of-fold squared
    error :math:`\sum_k \lVert z_k - \hat f_{-k} \rVert^2` (no step columns, no
    undersmoothing); the fit on all rows is returned with its residuals
    inflated to the scale of new noise, :math:`e = (z - \hat f)\sqrt{n / (n -
    \mathrm{df})}`. Cross-validation, not GCV, because the folds keep whole
    clusters together: GCV absorbed a clustered null's per-cluster effects.

    Returns
    -------
    (fit, residuals) : two (n,) arrays

    Examples
    --------
    >>> import numpy as np
    >>> b = np.linspace(0, 1, 60)
    >>> fit, e = cv_ridge_fit(control_basis(b[:, None]), b**2, np.arange(60) % 5)
    >>> bool(np.abs(fit - b**2).max() < 0.05)
    True
    """
    z = np.asarray(z, dtype=float)
    scales = [s for s in _INTERACTION_SCALES if s == 0 or basis.interactions.shape[1]]
    error = np.zeros((len(scales), len(_PENALTIES)))
    for fold in np.unique(folds):
        test, train = folds == fold, folds != fold
        mean = z[train].mean()
        for i, scale in enumerate(scales):
            spectrum = _fold_spectrum(basis, train, test, scale)
            if spectrum.d is None:
                error[i] += ((z[test] - mean) ** 2).sum()
                continue
            pred = _ridge_predictions(spectrum, z[train] - mean, _PENALTIES[:, None]) + mean
            error[i] += ((z[test][:, None] - pred) ** 2).sum(axis=0)
    i, j = np.unravel_index(np.argmin(error), error.shape)
    every = np.ones(len(z), dtype=bool)
    spectrum = _fold_spectrum(basis, every, every, scales[i])
    if spectrum.d is None:
        return np.full(len(z), z.mean()), z - z.mean()
    fit = _ridge_predictions(spectrum, z - z.mean(), _PENALTIES[j]) + z.mean()
    lam = _PENALTIES[j] * np.mean(spectrum.d ** 2)
    dof = (spectrum.d ** 2 / (spectrum.d ** 2 + lam)).sum() + 1
    return fit, (z - fit) * np.sqrt(len(z) / max(len(z) - dof, 1))


def twin_columns(fit: np.ndarray, residuals: np.ndarray, twins: int,
                 rng: np.random.Generator) -> np.ndarray:
    r"""A synthetic target and ``twins`` twins: the target's fit plus permuted residuals.

    Column 0 is :math:`Y^* = \hat f + e_{\pi_0}`, column k is :math:`T_k =
    \hat f + e_{\pi_k}`, with independent row permutations: every twin is
    conditionally independent of :math:`Y^*` given the controls by
    construction, and both have the target's own dependence on them. A twin
    the cross-fitted test calls associated with :math:`Y^*` is therefore a
    false call on a response of this very shape (see :func:`cv_ridge_fit`).

    Examples
    --------
    >>> import numpy as np
    >>> twin_columns(np.zeros(4), np.arange(4.0), 2, np.random.default_rng(0)).shape
    (4, 3)
    """
    order = np.argsort(rng.random((twins + 1, len(fit))), axis=1)
    return fit[:, None] + residuals[order].T


@dataclass(frozen=True)
class KeptFits:
    """The target's per-fold fits (for :func:`refit_residuals`) and every response's fitted df.

    Examples
    --------
    >>> import numpy as np
    >>> b = np.linspace(0, 1, 50)
    >>> e, kept = crossfit_residuals(control_basis(b[:, None]), np.column_stack([b**2, -b]),
    ...                              np.arange(50) % 5, keep=0)
    >>> len(kept.folds), kept.dof.shape
    (5, (2,))
    """

    folds: list               # one _FoldFit per fold
    dof: np.ndarray           # (R,) effective degrees of freedom of each response's fit, fold mean

    @property
    def compact(self) -> list:
        """Per fold, the projection on distinct rows (:attr:`_FoldFit.compact`) or None."""
        return [fold.compact for fold in self.folds]

    def fit_cells(self, n: int) -> np.ndarray:
        """(n,) codes, equal where two rows get the same refit of any column: the same fold and,
        where the fold was compacted, the same distinct row of the basis.

        Examples
        --------
        >>> import numpy as np
        >>> b = np.repeat(np.linspace(0, 1, 20), 3)          # 20 configurations, 3 seeds each
        >>> folds = fold_ids(60, 5, seed=0, clusters=np.repeat(np.arange(20), 3))
        >>> _, kept = crossfit_residuals(control_basis(b[:, None]), (b**2)[:, None], folds, keep=0)
        >>> len(np.unique(kept.fit_cells(60)))
        20
        """
        cells = np.arange(n)
        start = 0
        for fold in self.folds:
            rows, small = np.flatnonzero(fold.test), fold.compact
            cells[rows] = start + (np.arange(len(rows)) if small is None else small[2])
            start += len(rows)
        return cells

    def cell_fit_weights(self, first: np.ndarray, codes: np.ndarray, e_y: np.ndarray) -> np.ndarray:
        r"""(C, G) weights :math:`W` with the wild refit's fits of the cells, :math:`F = W\eta`.

        A wild draw refits :math:`v = e_Y \circ \eta_{g}` (signs :math:`\eta`, (G,), per
        cluster ``codes``); the fit at row :math:`i` of a fold is :math:`(P v)_i =
        \sum_g \big(\sum_{j \in g} P_{ij} e_{Y,j}\big) \eta_g`, so the row ``first[c]``
        of every cell gives one row of :math:`W` and all draws cost one (C, G) product
        instead of a refit of every row (:func:`refit_residuals`).

        Examples
        --------
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> b = np.repeat(rng.uniform(size=20), 3)
        >>> codes = np.repeat(np.arange(20), 3)
        >>> e, kept = crossfit_residuals(control_basis(b[:, None]), rng.normal(size=(60, 1)),
        ...                              fold_ids(60, 5, seed=0, clusters=codes), keep=0)
        >>> signs = rng.choice([-1.0, 1.0], size=(20, 4))
        >>> flipped = e[:, :1] * signs[codes]
        >>> w = kept.cell_fit_weights(np.arange(60), codes, e[:, 0])
        >>> bool(np.allclose(w @ signs, flipped - refit_residuals(kept, flipped)))
        True
        """
        groups = int(codes.max()) + 1
        weights = np.zeros((len(first), groups))
        for fold in self.folds:
            rows = np.flatnonzero(fold.test)
            mine = np.flatnonzero(fold.test[first])                 # the cells of this fold
            if not len(mine):
                continue
            local = np.searchsorted(rows, first[mine])               # their rows among the test rows
            small = fold.compact
            if small is None:                                        # P over every training row
                train = np.flatnonzero(fold.train)
                unit, columns, width = np.arange(len(train)), None, len(train)
            else:                                                    # P = F P_u E^T
                p_u, sums, test_codes = small
                train = sums.indices
                unit = np.repeat(np.arange(sums.shape[0]), np.diff(sums.indptr))
                columns = p_u[test_codes[local]]
                width = columns.shape[1]
            by_cluster = np.bincount(unit * groups + codes[train], weights=e_y[train],
                                     minlength=width * groups).reshape(width, groups)
            weights[mine] = (_times(fold, by_cluster, local) if columns is None
                             else columns @ by_cluster)
        return weights


#: A fold's (n_test, n_train) projection is applied through its factors (:func:`_times`) when
#: it has this many times more entries than the factors, (n_test + n_train) x rank: at
#: n = 20,000 rows with six controls the full matrices took 4.5 GB and 32 s of a one-metric
#: audit, 2 GB and 6.7 s without. Both routes give the same numbers to rounding (1e-15).
_FACTOR_GAIN = 1.0


def _factored(fold) -> bool:
    """Whether ``fold`` (a :class:`_FoldFit` or :class:`_IndexFoldFit`) is cheaper to apply
    through its factors than through its projection."""
    n_test, n_train = int(fold.test.sum()), int(fold.train.sum())
    return n_test * n_train > _FACTOR_GAIN * (n_test + n_train) * max(fold.rank, 1)


def _times(fold, columns, rows=None) -> np.ndarray:
    r""":math:`P_{rows} C` for training columns ``C`` (n_train, k), dense or sparse, through
    the projection or, for a large fold, its factors: :math:`A_{rows} (B^\top C) +
    \mathbf{1} (\mathbf{1}^\top C) / n_{train}`, never the (n_test, n_train) matrix.

    Examples
    --------
    >>> import numpy as np
    >>> b = np.linspace(0, 1, 50)
    >>> _, kept = crossfit_residuals(control_basis(b[:, None]), (b**2)[:, None], np.arange(50) % 5, keep=0)
    >>> fold, c = kept.folds[0], np.random.default_rng(0).normal(size=(40, 3))
    >>> a, bc = fold.factors
    >>> bool(np.allclose(fold.projection @ c, a @ (bc.T @ c) + c.sum(axis=0) / 40))
    True
    """
    if not _factored(fold):
        projection = fold.projection if rows is None else fold.projection[rows]
        return np.asarray(projection @ columns)
    a, b = fold.factors
    a = a if rows is None else a[rows]
    inner = np.asarray((columns.T @ b).T)                     # B^T C, also for sparse C
    total = np.asarray(columns.sum(axis=0)).reshape(1, -1)
    return a @ inner + total / b.shape[0]


def _times_transposed(fold, columns: np.ndarray) -> np.ndarray:
    r""":math:`P^\top c` for test columns ``c`` (n_test, k), as :func:`_times`:
    :math:`B (A^\top c) + \mathbf{1}(\mathbf{1}^\top c) / n_{train}`."""
    if not _factored(fold):
        return fold.projection.T @ columns
    a, b = fold.factors
    return b @ (a.T @ columns) + columns.sum(axis=0, keepdims=True) / b.shape[0]


def _weighted_square_sums(fold, weights: np.ndarray) -> np.ndarray:
    r""":math:`\sum_j P_{ij}^2 w_j^2` for every test row i (``weights`` (n_train,)); for a large
    fold :math:`a_i^\top G a_i + 2 a_i^\top h / n + \sum_j w_j^2 / n^2` with :math:`G =
    B^\top \operatorname{diag}(w^2) B`, :math:`h = B^\top w^2`."""
    if not _factored(fold):
        return ((fold.projection * weights) ** 2).sum(axis=1)
    a, b = fold.factors
    n, w2 = b.shape[0], weights**2
    return (((a @ ((b * w2[:, None]).T @ b)) * a).sum(axis=1)
            + 2.0 * a @ (b.T @ w2) / n + w2.sum() / n**2)


def refit_residuals(operators, columns: np.ndarray) -> np.ndarray:
    """Residualise new columns (n, B) with the fits kept by ``crossfit_residuals(keep=j)``.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import stats
    >>> rng = np.random.default_rng(0)
    >>> b = rng.uniform(size=60)
    >>> y = b**2 + rng.normal(0, .1, 60)
    >>> basis, folds = control_basis(b[:, None]), np.arange(60) % 5
    >>> e, kept = crossfit_residuals(basis, y[:, None], folds, keep=0)
    >>> again = refit_residuals(kept, (stats.rankdata(y) / 60)[:, None])   # the same ranked column
    >>> bool(np.allclose(again, e))
    True
    """
    out = np.empty_like(columns)
    for fold in operators.folds:
        test, small = fold.test, fold.compact
        if small is None:
            out[test] = columns[test] - _times(fold, columns[fold.train])
        else:
            p_u, sums, test_codes = small
            out[test] = columns[test] - (p_u @ (sums @ columns))[test_codes]
    return out


def _studentised(e_m: np.ndarray, e_y: np.ndarray, clusters: np.ndarray | None) -> np.ndarray:
    r"""GCM statistics (K, B) of residual columns ``e_m`` (n, K) against ``e_y`` (n, B).

    With clusters, :math:`\sum_g S_g^2` is one product over the within-cluster
    pairs :math:`i \le j`: :math:`\sum_{(i,j)} w_{ij} (e_{M,i} e_{M,j})
    (e_{Y,i} e_{Y,j})^\top`, :math:`w = 1` on the diagonal and 2 off it.
    """
    n = len(e_y)
    sums = e_m.T @ e_y
    if clusters is None:
        variance = (e_m**2).T @ (e_y**2) - sums**2 / n
        return sums / np.sqrt(np.maximum(variance, 1e-300))
    codes = pd.factorize(clusters)[0]
    if min(sums.shape) <= _FEW_COLUMNS:
        return sums / np.sqrt(np.maximum(_few_cluster_variance(e_m, e_y, codes, sums), 1e-300))
    sizes = np.bincount(codes)
    pairs = _cluster_pairs(codes)
    square = np.zeros_like(sums)
    for start in range(0, len(pairs[0]), 8 * n):          # bounded memory for large clusters
        first, second = (side[start:start + 8 * n] for side in pairs)
        weight = np.where(first == second, 1.0, 2.0)[:, None]
        square += (e_m[first] * e_m[second] * weight).T @ (e_y[first] * e_y[second])
    cross = (e_m * sizes[codes][:, None]).T @ e_y
    variance = square - 2 * cross * sums / n + sums**2 * (sizes**2).sum() / n**2
    return sums / np.sqrt(np.maximum(variance, 1e-300))


#: Below this many columns on either side, :func:`_studentised` sums the products per cluster
#: one column at a time (n K B products) instead of one product over the within-cluster pairs.
_FEW_COLUMNS = 16


def _few_cluster_variance(e_m: np.ndarray, e_y: np.ndarray, codes: np.ndarray,
                          sums: np.ndarray) -> np.ndarray:
    r""":math:`\sum_g (S_g - n_g S / n)^2` per pair of columns, one column of the thinner side at
    a time: :math:`S_g` are the cluster sums of :math:`e_{M,i} e_{Y,i}`, one sparse product."""
    n = len(codes)
    sizes = np.bincount(codes)[:, None]
    indicator = _indicator(codes, len(sizes))
    variance = np.empty_like(sums)
    if sums.shape[0] <= sums.shape[1]:
        for k in range(sums.shape[0]):
            g = indicator @ (e_m[:, k, None] * e_y)
            variance[k] = ((g - sizes * (sums[k] / n)) ** 2).sum(axis=0)
    else:
        for b in range(sums.shape[1]):
            g = indicator @ (e_m * e_y[:, b, None])
            variance[:, b] = ((g - sizes * (sums[:, b] / n)) ** 2).sum(axis=0)
    return variance


def _cluster_pairs(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(i, j)``, ``i <= j``, of every pair of rows in the same cluster.

    Examples
    --------
    >>> [a.tolist() for a in _cluster_pairs(np.array([0, 1, 0]))]
    [[1, 0, 0, 2], [1, 0, 2, 2]]
    """
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    first, second = [], []
    for size in np.unique(sizes[sizes > 0]):            # clusters of one size at a time
        rows = order[starts[sizes == size][:, None] + np.arange(size)]   # (clusters, size)
        i, j = np.triu_indices(size)
        first.append(rows[:, i].ravel())
        second.append(rows[:, j].ravel())
    return np.concatenate(first), np.concatenate(second)


def wild_gcm_p(e_m: np.ndarray, e_y: np.ndarray, operators, draws: int,
               rng: np.random.Generator, clusters: np.ndarray | None = None) -> np.ndarray:
    r"""p-values of the studentised GCM, calibrated by a wild (sign-flip) refit of the target.

    ``operators`` are the fits kept by ``crossfit_residuals(..., keep=j)`` (a :class:`KeptFits`);
    :math:`p = (1 + \#\{|T^*| \ge |T|\}) / (1 + \mathrm{draws})` per column of ``e_m``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> b = rng.uniform(-2.5, 2.5, 200)
    >>> m, y = b**2 + rng.normal(0, .2, 200), b**2 + rng.normal(0, .4, 200)
    >>> e, kept = crossfit_residuals(control_basis(b[:, None]), np.column_stack([y, m]),
    ...                              fold_ids(200, 5, seed=0), keep=0)
    >>> p = wild_gcm_p(e[:, 1], e[:, 0], kept, draws=199, rng=np.random.default_rng(1))
    >>> p.shape, bool(p[0] > 0.01)
    ((1,), True)
    """
    e_m = np.asarray(e_m, dtype=float).reshape(len(e_y), -1)
    codes = np.arange(len(e_y)) if clusters is None else pd.factorize(clusters)[0]
    signs = rng.choice([-1.0, 1.0], size=(codes.max() + 1, draws))
    observed = np.abs(_studentised(e_m, e_y[:, None], clusters)[:, 0])
    if clusters is None:
        star = refit_residuals(operators, e_y[:, None] * signs[codes])
    else:                                 # per cell: F = W signs (KeptFits.cell_fit_weights)
        cells = _ClusterCells.of(codes, operators.fit_cells(len(e_y)), e_m, e_y)
        weights = operators.cell_fit_weights(cells.first, codes, e_y)
    exceed = np.zeros(e_m.shape[1])
    for start in range(0, draws, 256):
        part = slice(start, start + 256)
        null = np.abs(_studentised(e_m, star[:, part], None) if clusters is None
                      else cells.statistics(signs[:, part], weights @ signs[:, part]))
        exceed += (null >= observed[:, None] - 1e-12).sum(axis=1)
    return (1.0 + exceed) / (draws + 1.0)


@dataclass(frozen=True)
class _ClusterCells:
    r"""The wild refits' clustered GCM statistics from sums per cell instead of per row pair.

    A refit is :math:`e^*_i = \eta_{g(i)} e_{Y,i} - F_{c(i)}`: the cluster's
    sign times the target's residual, minus a fit :math:`F` that is the same
    for every row of a *cell* :math:`c` (one cluster's rows with one distinct
    basis row in one fold; :meth:`KeptFits.fit_cells`). With :math:`a_g =
    \sum_{i \in g} e_{M,i} e_{Y,i}` and :math:`b_c = \sum_{i \in c} e_{M,i}`,

    .. math:: S_g = \eta_g a_g - \sum_{c \in g} b_c F_c, \qquad
              \sum_g S_g^2 = \sum_g a_g^2 - 2 \sum_c (a_{g(c)} b_c)(\eta_{g(c)} F_c)
                 + \sum_g \Big(\sum_{c \in g} b_c F_c\Big)^2,

    every term a matrix product over cells (or pairs of cells in a cluster):
    a grid's configuration is one cell, so the 680 rows of
    ``bench/bench_crossfit.py`` become 136 cells and 2,040 row pairs 136.
    """

    clusters: np.ndarray      # (C,) cluster code of each cell
    first: np.ndarray         # (C,) a row of each cell
    a: np.ndarray             # (G, K)
    b: np.ndarray             # (C, K)
    sizes: np.ndarray         # (G,) rows per cluster
    pairs: tuple | None       # cell pairs within a cluster, None when every cluster is one cell

    @classmethod
    def of(cls, codes: np.ndarray, fit_cells: np.ndarray, e_m: np.ndarray, e_y: np.ndarray):
        key = codes.astype(np.int64) * (int(fit_cells.max()) + 1) + fit_cells  # (cluster, cell) order
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        clusters = codes[first]
        pairs = None if len(first) == codes.max() + 1 else _cluster_pairs(clusters)
        return cls(clusters, first, _sum_by(e_m * e_y[:, None], codes), _sum_by(e_m, inverse),
                   np.bincount(codes).astype(float), pairs)

    def statistics(self, signs: np.ndarray, fits: np.ndarray) -> np.ndarray:
        """Studentised statistics (K, B) for cluster signs (G, B) and cell fits (C, B)."""
        n = self.sizes.sum()
        a, b, own = self.a, self.b, self.clusters
        sums = a.T @ signs - b.T @ fits
        cross = (self.sizes[:, None] * a).T @ signs - (self.sizes[own][:, None] * b).T @ fits
        square = (a**2).sum(axis=0)[:, None] - 2 * (a[own] * b).T @ (signs[own] * fits)
        if self.pairs is None:
            square += (b**2).T @ (fits**2)
        else:
            first, second = self.pairs
            weight = np.where(first == second, 1.0, 2.0)[:, None]
            square += (b[first] * b[second] * weight).T @ (fits[first] * fits[second])
        variance = square - 2 * cross * sums / n + sums**2 * (self.sizes**2).sum() / n**2
        return sums / np.sqrt(np.maximum(variance, 1e-300))


def adjoint_residuals(operators, columns: np.ndarray) -> np.ndarray:
    r"""The adjoint of :func:`refit_residuals`: :math:`A^\top c` for columns ``c`` (n, K).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> b = rng.uniform(size=60)
    >>> _, kept = crossfit_residuals(control_basis(b[:, None]), (b**2)[:, None], np.arange(60) % 5, keep=0)
    >>> x, c = rng.normal(size=(2, 60, 1))
    >>> bool(np.isclose((c * refit_residuals(kept, x)).sum(), (x * adjoint_residuals(kept, c)).sum()))
    True
    """
    out = np.array(columns, dtype=float, copy=True)
    for fold in operators.folds:
        out[fold.train] -= _times_transposed(fold, columns[fold.test])
    return out


def wild_scale(e_m: np.ndarray, e_y: np.ndarray, operators,
               clusters: np.ndarray | None = None) -> np.ndarray:
    r"""The wild refit's inflation :math:`\tau^2 = \operatorname{Var}^*(S^*) / E^*[V^*]` per column.

    ``e_m`` (n, K) are residual columns tested against the target's
    residuals ``e_y`` (n,), whose fits ``operators`` were kept by
    ``crossfit_residuals(..., keep=j)``; see the module docstring for the
    two closed-form moments. Signs flip per cluster when ``clusters`` is given.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> b = rng.uniform(size=80)
    >>> e, kept = crossfit_residuals(control_basis(b[:, None]), rng.normal(size=(80, 2)),
    ...                              np.arange(80) % 5, keep=0)
    >>> tau2 = wild_scale(e[:, 1:], e[:, 0], kept)
    >>> tau2.shape, bool(0.5 < tau2[0] < 2.0)
    ((1,), True)
    """
    n = len(e_y)
    e_m = np.asarray(e_m, dtype=float).reshape(n, -1)
    codes = np.arange(n) if clusters is None else pd.factorize(clusters)[0]
    var_star = (_sum_by(adjoint_residuals(operators, e_m) * e_y[:, None], codes) ** 2).sum(axis=0)
    expected_v = (_sum_by(e_m * e_y[:, None], codes) ** 2).sum(axis=0)
    for fold in operators.folds:
        test, train = fold.test, fold.train
        if clusters is None:                                      # Q = P diag(e_Y): a row's own sum
            expected_v += (e_m[test] ** 2).T @ _weighted_square_sums(fold, e_y[train])
            continue
        train_codes = pd.factorize(codes[train])[0]
        if _factored(fold):                                       # Q summed per training cluster
            q = _times(fold, _indicator(train_codes).T.multiply(e_y[train][:, None]).tocsr())
        else:
            q = _sum_by((fold.projection * e_y[train]).T, train_codes).T   # (n_test, clusters)
        by_test_cluster = _indicator(pd.factorize(codes[test])[0])
        e_test = e_m[test]
        for k in range(e_m.shape[1]):                             # Q_g^T e_M,g for every g at once
            expected_v[k] += (np.asarray(by_test_cluster @ (e_test[:, k, None] * q)) ** 2).sum()
    return var_star / np.maximum(expected_v, 1e-300)


def _indicator(codes: np.ndarray, groups: int | None = None, columns: np.ndarray | None = None,
               width: int | None = None) -> sparse.csr_matrix:
    """The sparse (G, n) matrix with a 1 at (code of row i, i): ``_indicator(codes) @ v`` sums
    the rows of ``v`` per code (codes 0..G-1); with ``columns``, the 1 of entry i sits in
    column ``columns[i]`` of a ``width``-column matrix instead.

    Built in CSR form directly (a stable sort by code), half the time of scipy's COO path.

    Examples
    --------
    >>> _indicator(np.array([1, 0, 1])).toarray().tolist()
    [[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]
    """
    groups = int(codes.max()) + 1 if groups is None else groups
    columns = np.arange(len(codes)) if columns is None else columns
    width = len(codes) if width is None else width
    order = np.argsort(codes, kind="stable")
    starts = np.zeros(groups + 1, dtype=np.int64)
    np.cumsum(np.bincount(codes, minlength=groups), out=starts[1:])
    return sparse.csr_matrix((np.ones(len(codes)), columns[order], starts), shape=(groups, width))


def _sum_by(values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Sum the rows of ``values`` (n, K) that share a code (codes 0..G-1); (G, K)."""
    if len(codes) == codes.max() + 1 and (codes == np.arange(len(codes))).all():
        return values
    return np.asarray(_indicator(codes) @ values)


@dataclass(frozen=True)
class GCMTest:
    """Result of :func:`gcm_test`: residual correlation, its interval, the GCM statistic and p.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> test = gcm_test(rng.normal(size=200), rng.normal(size=200))
    >>> type(test).__name__, test.dof, test.lo < test.r < test.hi, test.p > 0.05
    ('GCMTest', 199, True, True)
    """

    r: float
    lo: float
    hi: float
    statistic: float
    p: float
    dof: int
    #: out-of-fold share of the metric's rank variance that the controls explain,
    #: :math:`1 - \overline{e_M^2} / \operatorname{Var}(\operatorname{rank} M / (n + 1))`
    #: (:func:`adjusted_test` only; NaN from :func:`gcm_test`)
    explained: float | np.ndarray = float("nan")
    #: the out-of-fold residuals, target first then every metric, (n, 1 + K)
    #: (:func:`adjusted_test` only)
    residuals: np.ndarray | None = field(default=None, repr=False, compare=False)


def _cluster_sums(values: np.ndarray, clusters: np.ndarray | None) -> np.ndarray:
    """Sum rows of ``values`` (n, ...) within clusters (identity without clusters)."""
    if clusters is None:
        return values
    flat = values.reshape(len(values), -1)
    return _sum_by(flat, pd.factorize(clusters)[0]).reshape((-1,) + values.shape[1:])


def gcm_statistic(e_m: np.ndarray, e_y: np.ndarray, clusters) -> tuple[np.ndarray, int]:
    r"""The studentised GCM statistics (K,) of residual columns ``e_m`` (n, K) against ``e_y``
    (n, 1), :math:`\sum_i e_{M,i} e_{Y,i} / \hat\sigma`, and the number of independent units
    (rows, or clusters when given); :func:`gcm_test` adds its p-value and interval.

    Examples
    --------
    >>> import numpy as np
    >>> e = np.random.default_rng(0).normal(size=(100, 3))
    >>> statistic, units = gcm_statistic(e[:, :2], e[:, 2:], None)
    >>> bool(np.allclose(statistic, gcm_test(e[:, :2], e[:, 2]).statistic)), units
    (True, 100)
    """
    products = e_m * e_y
    sums = _cluster_sums(products, clusters)
    units = len(sums)
    centred = sums - _cluster_sums(np.ones((len(e_y), 1)), clusters) * products.mean(axis=0)
    variance = (centred**2).sum(axis=0) * units / max(units - 1, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return products.sum(axis=0) / np.sqrt(variance), units


def gcm_test(e_m: np.ndarray, e_y: np.ndarray, clusters: np.ndarray | None = None,
             ci: float = 0.95, fitted_dof: float = 0.0, fits: KeptFits | None = None,
             draws: int = 999, rng: np.random.Generator | None = None) -> GCMTest:
    r"""Studentised generalised covariance measure of two residual vectors.

    ``e_m`` may be (n,) or (n, K) (K residual columns tested against the same
    ``e_y``); then every field of the result is an array of length K.
    ``fitted_dof``, the mean effective degrees of freedom of the two fits,
    inflates the interval's variance by :math:`n / (n - \mathrm{df})` (as HC1
    does for least squares): out-of-fold residuals of a fitted smoother vary
    less than the errors they estimate. ``fits``, the target's fits kept by
    ``crossfit_residuals(..., keep=j)``, calibrates the test for the cross-fit:
    ``p`` comes from ``draws`` wild refits (:func:`wild_gcm_p`, drawn from
    ``rng``) and the interval is inflated by :func:`wild_scale`; without them
    the test is the plain GCM with Student's t.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> a, b = rng.normal(size=(2, 500))
    >>> t = gcm_test(a + b, b)
    >>> round(t.r, 2), t.p < 1e-10, t.lo < t.r < t.hi
    (0.76, True, True)
    """
    if len(e_m) != len(e_y):
        raise MBEInputError(f"the residual vectors have different lengths ({len(e_m)} and "
                            f"{len(e_y)}); give one residual per row in each")
    if not 0 < ci < 1:
        raise MBEInputError(f"ci must be a coverage between 0 and 1, got {ci!r}")
    single = np.ndim(e_m) == 1
    e_m = np.asarray(e_m, dtype=float).reshape(len(e_m), -1)
    e_y = np.asarray(e_y, dtype=float).reshape(-1, 1)
    statistic, units = gcm_statistic(e_m, e_y, clusters)
    dof = max(units - 1, 1)
    if fits is None:
        p, tau2, covers_zero = 2.0 * stats.t.sf(np.abs(statistic), dof), np.ones(e_m.shape[1]), None
    else:
        rng = np.random.default_rng(0) if rng is None else rng
        p = wild_gcm_p(e_m, e_y[:, 0], fits, draws, rng, clusters)
        tau2 = wild_scale(e_m, e_y[:, 0], fits, clusters)
        covers_zero = p >= round(1.0 - ci, 12)       # not significant at its level (p = alpha is not)
    r, lo, hi = _correlation_interval(e_m, e_y, clusters, ci, dof, fitted_dof,
                                      np.maximum(tau2, 1.0), covers_zero)
    fields = (r, lo, hi, statistic, p)
    if single:
        fields = tuple(float(v[0]) for v in fields)
    return GCMTest(*fields, dof=dof)


def adjusted_test(basis: ControlBasis, target: np.ndarray, metrics: np.ndarray, folds: np.ndarray,
                  clusters: np.ndarray | None = None, ci: float = 0.95, draws: int = 999,
                  rng: np.random.Generator | None = None) -> GCMTest:
    """The audit's cross-fitted test: residualise ``target`` and ``metrics`` (n,) or (n, K) on
    the basis, then :func:`gcm_test` calibrated by ``draws`` wild refits of the target's fits.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> b = rng.uniform(-2.5, 2.5, 300)
    >>> test = adjusted_test(control_basis(b[:, None]), b**2 + rng.normal(0, .4, 300),
    ...                      b**2 + rng.normal(0, .2, 300), fold_ids(300, 5), draws=199)
    >>> bool(test.p > 0.01), bool(test.lo < test.r < test.hi)
    (True, True)
    """
    responses = np.column_stack([target, metrics])
    residuals, fits = crossfit_residuals(basis, responses, folds, keep=0)
    metric_residuals = residuals[:, 1] if np.ndim(metrics) == 1 else residuals[:, 1:]
    test = gcm_test(metric_residuals, residuals[:, 0], clusters, ci,
                    fitted_dof=float(fits.dof.mean()), fits=fits, draws=draws, rng=rng)
    n = len(residuals)
    spread = (column_ranks(responses[:, 1:]) / (n + 1)).var(axis=0)
    explained = 1.0 - (residuals[:, 1:] ** 2).mean(axis=0) / np.maximum(spread, 1e-300)
    return replace(test, explained=float(explained[0]) if np.ndim(metrics) == 1 else explained,
                   residuals=residuals)


def within_configuration_test(metric: np.ndarray, target: np.ndarray, rows: np.ndarray,
                              draws: int = 999, rng: np.random.Generator | None = None) -> tuple:
    r"""Association of a metric with the target among runs with the same controls.

    Runs that share a configuration (equal codes in ``rows``: the same value of
    every control, e.g. seeds of one grid point) share any function of the
    controls, so centring the ranks :math:`u = \operatorname{rank}/(n+1)`
    within each configuration removes the design's whole effect without
    learning it. The statistic is :math:`T = \sum_i e_{M,i} e_{Y,i}` of the
    centred ranks; its p-value comes from ``draws`` permutations of the
    metric within every configuration, :math:`p = (1 + \#\{|T^*| \ge
    |T|\}) / (1 + \mathrm{draws})`, exact when the runs of a configuration
    are exchangeable (seeds). Configurations with a single run carry nothing
    and are left out.

    Returns
    -------
    (r, p, runs) : the correlation of the centred ranks, its p-value and the
        number of runs in configurations of two or more (NaN, NaN, runs when
        fewer than 3 such runs).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> config = np.repeat(np.arange(30), 5)              # 30 configurations x 5 seeds
    >>> shape, trait = rng.normal(size=30)[config], rng.normal(size=150)
    >>> r, p, runs = within_configuration_test(shape + trait, shape + trait + rng.normal(size=150),
    ...                                        config, rng=rng)
    >>> round(r, 2), p < 0.01, runs
    (0.65, True, 150)
    >>> r, p, _ = within_configuration_test(shape + rng.normal(size=150), shape, config, rng=rng)
    >>> bool(p > 0.05)                                    # a pure proxy of the design
    True
    """
    rng = np.random.default_rng(0) if rng is None else rng
    codes = pd.factorize(np.asarray(rows))[0]
    replicated = np.bincount(codes)[codes] >= 2
    runs = int(replicated.sum())
    if runs < 3:
        return float("nan"), float("nan"), runs
    ranks = column_ranks(np.column_stack([metric, target]).astype(float)) / (len(codes) + 1)
    ranks, codes = ranks[replicated], pd.factorize(codes[replicated])[0]
    centred = ranks - _sum_by(ranks, codes)[codes] / np.bincount(codes)[codes, None]
    e_m, e_y = centred[:, 0], centred[:, 1]
    scale = np.sqrt((e_m @ e_m) * (e_y @ e_y))
    if scale == 0:
        return float("nan"), float("nan"), runs
    statistic = e_m @ e_y
    exceed = 0
    for start in range(0, draws, 256):                        # 256 shuffles at once
        perms = shuffles_within(codes, min(256, draws - start), rng)
        exceed += int(np.sum(np.abs(e_m[perms] @ e_y) >= abs(statistic) - 1e-12))
    return float(statistic / scale), (1.0 + exceed) / (draws + 1.0), runs


@dataclass(frozen=True)
class Neighbours:
    """Each run's two nearest neighbours in the controls (:func:`neighbour_pairs`): row
    indices (n,), -1 where a run has none, and their distances (NaN there).

    Examples
    --------
    >>> import numpy as np
    >>> pairs = neighbour_pairs(control_basis(np.linspace(0, 1, 8)[:, None]))
    >>> int(pairs.first[0]), int(pairs.second[0]), float(pairs.far[0] / pairs.near[0])
    (1, 2, 2.0)
    """

    first: np.ndarray
    second: np.ndarray
    near: np.ndarray          # distance to ``first``
    far: np.ndarray           # distance to ``second``


def neighbour_pairs(basis: ControlBasis, clusters: np.ndarray | None = None,
                    folds: np.ndarray | None = None) -> Neighbours:
    r"""Each run's nearest and second-nearest neighbours in the controls.

    A neighbour is a run close in the ranks of the numeric controls with many
    values (Euclidean), among the runs with the same one-hot levels and a
    different configuration of the controls (and a different cluster, when
    given): seeds of one configuration share its deviations, not only its
    shape. The second neighbour is the nearest run of yet another
    configuration. With ``folds``, only runs of the same fold are neighbours:
    their residuals come from one fitted function. Designs without such
    numeric controls have no neighbours.

    Examples
    --------
    >>> import numpy as np
    >>> u = np.array([0.1, 0.2, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9])
    >>> pairs = neighbour_pairs(control_basis(u[:, None]))   # rows 1 and 2: one configuration
    >>> pairs.first.tolist(), pairs.second.tolist()
    ([2, 3, 3, 4, 5, 4, 7, 6, 7], [3, 0, 0, 2, 3, 6, 5, 8, 6])
    >>> neighbour_pairs(control_basis(u[:, None]), folds=np.arange(9) % 2).first.tolist()
    [2, 3, 0, 1, 6, 7, 8, 5, 6]
    """
    from scipy.spatial import cKDTree

    n = basis.n
    found = Neighbours(np.full(n, -1), np.full(n, -1), np.full(n, np.nan), np.full(n, np.nan))
    if basis.ranks is None or not basis.ranks.shape[1]:
        return found
    cells = np.column_stack([basis.levels, *([] if folds is None else [folds])])
    cells = (np.unique(cells, axis=0, return_inverse=True)[1].ravel() if cells.shape[1]
             else np.zeros(n, dtype=int))
    groups = basis.rows if clusters is None else pd.factorize(clusters)[0]
    for cell in np.unique(cells):
        members = np.flatnonzero(cells == cell)
        if len(members) < 2:
            continue
        k = min(len(members), 2 * int(np.bincount(groups[members]).max()) + 1)
        distance, index = cKDTree(basis.ranks[members]).query(basis.ranks[members], k=k)
        distance = distance.reshape(len(members), -1)
        candidates = members[index.reshape(len(members), -1)]
        rows = np.arange(len(members))
        other = groups[candidates] != groups[members][:, None]              # (m, k), self first
        first = candidates[rows, other.argmax(axis=1)]
        beyond = other & (groups[candidates] != groups[first][:, None])
        for kept, mask, target, gap in ((first, other, found.first, found.near),
                                        (candidates[rows, beyond.argmax(axis=1)], beyond,
                                         found.second, found.far)):
            has = mask.any(axis=1)
            target[members] = np.where(has, kept, -1)
            gap[members] = np.where(has, distance[rows, mask.argmax(axis=1)], np.nan)
    return found


def _paired(e_m: np.ndarray, e_y: np.ndarray, neighbours: np.ndarray) -> tuple:
    """``e_m`` as (n, K) and the runs that have a neighbour (None when fewer than 3 do)."""
    e_m = np.asarray(e_m, dtype=float).reshape(len(e_y), -1)
    paired = np.flatnonzero(neighbours >= 0)
    return e_m, (paired if len(paired) >= 3 else None)


def neighbour_test(e_m: np.ndarray, e_y: np.ndarray, neighbours: np.ndarray, sign: np.ndarray,
                   draws: int = 499, rng: np.random.Generator | None = None) -> np.ndarray:
    r"""One-sided p-values (K,) of the neighbour cross-products of residual columns ``e_m``
    (n, K) with the target's residuals ``e_y`` (n,), on the side ``sign`` (K,).

    A run's own increment (a trait the metric measures) ties its metric to its
    *own* target; a shape of the controls that the learner missed ties it to
    the target of a *neighbouring* run too. With :math:`j(i)` the neighbour of
    run :math:`i` (``neighbours``, the ``first`` of :func:`neighbour_pairs`),
    the statistic is

    .. math:: N = \sum_i e_{M,i}\, e_{Y,j(i)},

    and its reference is the same sum over random pairings of the runs
    (``draws`` of them): :math:`p = (1 + \#\{\pm N^* \ge \pm N\}) / (1 +
    \mathrm{draws})`. Where the cross-fit leaves no shape of the controls in
    both residuals, :math:`N` has mean zero whatever the metric's increment,
    so this p is uniform there; NaN without neighbours.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> u = rng.uniform(size=300)
    >>> shared = np.sin(40 * u)                            # a fast shape both residuals keep
    >>> near = neighbour_pairs(control_basis(u[:, None])).first
    >>> p = neighbour_test(np.column_stack([shared + rng.normal(size=300), rng.normal(size=300)]),
    ...                    shared + rng.normal(size=300), near, np.ones(2), rng=rng)
    >>> bool(p[0] < 0.01), bool(p[1] > 0.05)
    (True, True)
    """
    e_m, paired = _paired(e_m, e_y, neighbours)
    if paired is None:
        return np.full(e_m.shape[1], np.nan)
    rng = np.random.default_rng(0) if rng is None else rng
    observed = e_y[neighbours[paired]] @ e_m[paired]                          # (K,)
    shuffled = e_y[rng.permuted(np.tile(np.arange(len(e_y)), (draws, 1)), axis=1)[:, :len(paired)]]
    reference = shuffled @ e_m[paired]                                         # (draws, K)
    exceed = (sign * reference >= sign * observed - 1e-12).sum(axis=0)
    return (1.0 + exceed) / (1.0 + draws)


#: Longest extrapolation of a neighbour's residual towards a run, in units of the gap between
#: the distances of its two neighbours (:func:`beyond_neighbour_p`).
EXTRAPOLATION_CAP = 2.0


def beyond_neighbour_p(e_m: np.ndarray, e_y: np.ndarray, neighbours: Neighbours,
                       sign: np.ndarray) -> np.ndarray:
    r"""One-sided p-values (K,) of the association of residual columns ``e_m`` (n, K) with
    the target's residuals ``e_y`` (n,) beyond what a shape of the controls explains.

    A missed shape :math:`g` of the controls is continuous: the closer two
    runs, the more their residuals share it. A run's own increment is a jump
    at distance zero (a *nugget*, in the terms of geostatistics). The
    target's residual at the run's own place is therefore extrapolated from
    its two neighbours :math:`j, k` (:func:`neighbour_pairs`, at distances
    :math:`\delta_j \le \delta_k`), linearly in the distance:

    .. math:: \hat e_{Y,i} = e_{Y,j} + (e_{Y,j} - e_{Y,k})\,
              \min\Big(\frac{\delta_j}{\delta_k - \delta_j}, c\Big),

    with :math:`c` = :data:`EXTRAPOLATION_CAP`. The statistic is the
    studentised sum of :math:`d_i = e_{M,i}(e_{Y,i} - \hat e_{Y,i})` on the
    side ``sign``, referred to the normal. In expectation this compares the
    cross-covariance of the residuals at distance zero with its line through
    the two neighbours' distances: a shape that changes smoothly is
    extrapolated away, one that curves is over-extrapolated (conservative),
    and an increment is not. NaN with fewer than 3 runs that have two
    neighbours.

    Measured against the plain difference :math:`e_{Y,i} - e_{Y,j}`
    (``bench/unseen_nulls.py --claims``, 100 ledgers at n = 150 and 300):
    eight periods over one control 66 and 39 % -> 16 and 13 %, six periods
    45 and 24 -> 29 and 12 %, an optimum of its own per task 52 and 4 -> 41
    and 4 %, a step of its own per task 37 and 12 -> 32 and 7 %. A cap of 1
    gave 28 and 16 % on eight periods, 4 gave 13 and 11 %. One line fitted
    to every run's two neighbour products instead (its intercept as the
    extrapolation) took eight periods to 1 and 0 % but the per-task step up
    to 41 and 14 %. The audit asks for the association beyond the
    extrapolations from the nearest runs and from the nearest runs of the
    same fold both (:func:`mbe_helpers.audit._beyond_neighbours_p`).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> u = rng.uniform(size=400)
    >>> trait, shared = rng.normal(size=400), np.sin(40 * u)
    >>> near = neighbour_pairs(control_basis(u[:, None]))
    >>> p = beyond_neighbour_p(np.column_stack([trait + shared, shared + rng.normal(size=400)]),
    ...                        trait + shared + rng.normal(size=400), near, np.ones(2))
    >>> bool(p[0] < 0.01), bool(p[1] > 0.05)
    (True, True)
    """
    e_m = np.asarray(e_m, dtype=float).reshape(len(e_y), -1)
    paired = np.flatnonzero((neighbours.first >= 0) & (neighbours.second >= 0))
    if len(paired) < 3:
        return np.full(e_m.shape[1], np.nan)
    near, far = neighbours.near[paired], neighbours.far[paired]
    with np.errstate(invalid="ignore", divide="ignore"):
        reach = np.where(far > near, np.minimum(near / (far - near), EXTRAPOLATION_CAP),
                         EXTRAPOLATION_CAP)
    first, second = e_y[neighbours.first[paired]], e_y[neighbours.second[paired]]
    d = e_m[paired] * (e_y[paired] - first - (first - second) * reach)[:, None]   # (m, K)
    spread = d.std(axis=0, ddof=1) * np.sqrt(len(paired))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = sign * d.sum(axis=0) / spread
    return np.where(spread > 0, stats.norm.sf(z), np.nan)


def shuffles_within(groups: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` random row permutations (size, n), each moving rows only within their group
    (equal values of ``groups``): row ``i`` takes the value of row ``perms[k, i]``.

    Examples
    --------
    >>> import numpy as np
    >>> groups = np.array([0, 0, 1, 1, 1])
    >>> perms = shuffles_within(groups, 4, np.random.default_rng(0))
    >>> bool((groups[perms] == groups).all()), perms.shape
    (True, (4, 5))
    """
    if not (groups != 0).any():          # one group (coded 0): the same draws, without regrouping
        return np.argsort(rng.random((size, len(groups))), axis=1)
    slots = np.argsort(groups, kind="stable")                 # rows grouped
    shuffled = np.argsort(groups[slots] + rng.random((size, len(groups))), axis=1)
    perms = np.empty((size, len(groups)), dtype=int)
    perms[:, slots] = slots[shuffled]
    return perms


def _correlation_interval(e_m: np.ndarray, e_y: np.ndarray, clusters, ci: float, dof: int,
                          fitted_dof: float = 0.0, inflation_tau2=1.0, covers_zero=None):
    """Pearson r of residual columns with a Fisher-z interval from the influence function.

    The variance is inflated by ``inflation_tau2``; where ``covers_zero`` (the
    test does not reject at the interval's level) the interval is widened, if
    need be, until it reaches 0: it never excludes 0 where the test does not reject.
    """
    n = len(e_y)
    a = e_m - e_m.mean(axis=0)
    b = e_y - e_y.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        a = a / np.sqrt((a**2).mean(axis=0))
        b = b / np.sqrt((b**2).mean(axis=0))
        r = np.clip((a * b).mean(axis=0), -1.0, 1.0)
        influence = a * b - r * (a**2 + b**2) / 2.0
        sums = _cluster_sums(influence, clusters)
        units = len(sums)
        inflation = units / max(units - 1, 1) * n / max(n - fitted_dof, n / 2)
        se = np.sqrt((sums**2).sum(axis=0) * inflation * inflation_tau2) / n
        z = np.arctanh(np.clip(r, -0.999999, 0.999999))
        se_z = se / (1.0 - r**2)
        quantile = stats.t.ppf(0.5 + ci / 2, dof)
        if covers_zero is not None:
            se_z = np.where(covers_zero, np.fmax(se_z, np.abs(z) / quantile * (1 + 1e-9)), se_z)
        half = quantile * se_z
    return r, np.tanh(z - half), np.tanh(z + half)


def minimum_detectable_r(n: int, alpha: float = 0.05, power: float = 0.8, k: int = 0) -> float:
    r"""Smallest absolute correlation a two-sided test at ``alpha`` detects with ``power`` (Fisher z).

    .. math:: r_{\min} = \tanh\big((z_{1-\alpha/2} + z_{\mathrm{power}}) / \sqrt{n - 3 - k}\big)

    Examples
    --------
    >>> round(minimum_detectable_r(60), 2)
    0.35
    """
    _check_levels(alpha, power)
    dof = n - 3 - k
    if dof <= 0:
        raise MBEInputError(f"n = {n} rows leave no degrees of freedom for a correlation with "
                            f"{k} control(s); it needs at least {k + 4}")
    return float(np.tanh((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) / np.sqrt(dof)))


def _check_levels(alpha: float, power: float) -> None:
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise MBEInputError(f"alpha and power must lie strictly between 0 and 1, got alpha={alpha!r}, "
                            f"power={power!r}")


def rows_to_detect(r: float, alpha: float = 0.05, power: float = 0.8, k: int = 0) -> int:
    r"""Rows needed to detect a correlation of size ``r`` (inverse of :func:`minimum_detectable_r`).

    Examples
    --------
    >>> rows_to_detect(0.2)
    194
    """
    _check_levels(alpha, power)
    if not np.isfinite(r) or not 0 < abs(r) < 1:
        raise MBEInputError(f"r must be a nonzero correlation strictly between -1 and 1, got {r!r}")
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return int(np.ceil((z / np.arctanh(min(abs(r), 0.999999))) ** 2 + 3 + k))
