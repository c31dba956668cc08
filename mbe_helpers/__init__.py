"""mbe_helpers: audit metrics of neural networks against trivial baselines.

Modules (one idea each): ``audit`` (the MBE statistic), ``comparators``
(Jiang's and Dziugaite's yardsticks), ``fisher``
(per-sample-gradient geometry), ``spectral`` (weight spectra), ``credit``,
``feedback``, ``protocol``, ``models``, ``data``, ``train``, ``grid``,
``sources`` (tables of runs from files and MLflow), ``tracking`` (MLflow),
``plots`` and ``book`` (chapters, profiles, the ``mbe-book`` CLI).

Importing the package is cheap: it pulls in neither torch nor a plotting
library; submodules load what they need.  The core install (``pip install
mbe-helpers``) audits, simulates and fits spectra; the modules that train or
probe networks need the ``torch`` extra and say so in one sentence when it
is missing (``pip install 'mbe-helpers[torch]'``).
"""

from mbe_helpers.audit import AuditResult, audit, classify, partial_rank_corr, read_runs
from mbe_helpers.errors import MBEInputError, MissingExtraError

__version__ = "0.1.0"
__all__ = ["AuditResult", "MBEInputError", "MissingExtraError", "audit", "classify",
           "partial_rank_corr", "read_runs"]
