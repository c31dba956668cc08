"""The one exception type the package raises for bad input."""


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
