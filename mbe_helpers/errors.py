"""The exception types the package raises for bad input and for a missing optional extra."""

from __future__ import annotations

import importlib.util


class MBEInputError(ValueError):
    """Bad input from the user: the message is one sentence naming the problem.

    Command-line entry points print the message and exit with status 2;
    library callers can catch it as a plain ``ValueError``.

    Examples
    --------
    >>> from mbe_helpers.audit import check_alpha
    >>> try:
    ...     check_alpha(1.5)
    ... except ValueError as exc:
    ...     print(type(exc).__name__, exc)
    MBEInputError alpha must lie strictly between 0 and 1, got 1.5
    """


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra that brings it.

    A :class:`ModuleNotFoundError`, so ``try: import ... except ImportError``
    and ``pytest.importorskip`` behave as for the missing module itself.

    Examples
    --------
    >>> issubclass(MissingExtraError, ImportError)
    True
    """


def require_extra(module: str, extra: str, needed_by: str) -> None:
    """Raise :class:`MissingExtraError` in one sentence when ``module`` is not installed.

    ``extra`` is the ``mbe-helpers[...]`` extra that installs it and
    ``needed_by`` says what needs it (a module name or a feature).

    Examples
    --------
    >>> require_extra("json", "core", "reading ledgers")        # installed: nothing happens
    >>> require_extra("no_such_module", "torch", "mbe_helpers.train")
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MissingExtraError: mbe_helpers.train needs no_such_module, which is not installed; ...
    """
    top = module.split(".")[0]
    try:
        found = importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):  # a half-removed package: let the real import say why
        found = True
    if not found:
        raise MissingExtraError(f"{needed_by} needs {top}, which is not installed; install it with "
                                f"pip install 'mbe-helpers[{extra}]'.", name=top)
