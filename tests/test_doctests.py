"""Every module's docstring examples run, and every public function and class has one."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import mbe_helpers

MODULES = sorted(m.name for m in pkgutil.walk_packages(mbe_helpers.__path__, "mbe_helpers."))
#: Public names still without a doctested ``Examples`` section (the number may only go down).
MISSING_ALLOWED = 0


@pytest.mark.usefixtures("one_thread")     # the examples' tiny models: one torch thread is fastest
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed"


def public_names_without_examples() -> list[str]:
    missing = []
    for name in MODULES:
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and ">>>" not in (obj.__doc__ or ""):
                missing.append(f"{name}.{attr}")
    return missing


def test_public_names_have_examples() -> None:
    missing = public_names_without_examples()
    assert len(missing) <= MISSING_ALLOWED, (
        f"{len(missing)} public names lack an Examples section (allowed {MISSING_ALLOWED}); "
        f"first: {', '.join(missing[:5])}")
