"""The one exception type the package raises for bad input."""


class MBEInputError(ValueError):
    """Bad input from the user: the message is one sentence naming the problem.

    Command-line entry points print the message and exit with status 2;
    library callers can catch it as a plain ``ValueError``.
    """
