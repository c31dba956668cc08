"""mbe_helpers: audit metrics of neural networks against trivial baselines.

Modules (one idea each): ``audit`` (the MBE statistic), ``comparators``
(Jiang's and Dziugaite's yardsticks), ``fisher``
(per-sample-gradient geometry), ``spectral`` (weight spectra), ``credit``,
``feedback``, ``protocol``, ``models``, ``data``, ``train``, ``grid``,
``plots`` and ``book`` (chapters, profiles, the ``mbe-book`` CLI).

Importing the package is cheap: it pulls in neither torch nor a plotting
library; submodules load what they need.
"""

from mbe_helpers.audit import AuditResult, audit, classify, partial_rank_corr
from mbe_helpers.errors import MBEInputError

__version__ = "0.1.0"
__all__ = ["AuditResult", "MBEInputError", "audit", "classify", "partial_rank_corr"]
