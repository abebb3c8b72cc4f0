"""One exception type for mistakes a user can fix; the CLI prints these without a traceback."""


class LeanformerError(ValueError):
    """Bad input: the message names what was wrong, what was expected and the nearest valid choices."""
