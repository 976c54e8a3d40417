"""Error types that the CLI turns into one line and an exit code."""


class FskdError(Exception):
    """A failure the user can act on (bad model, bad samples, unwritable output): exit code 1."""


class UsageError(FskdError):
    """The command line itself is wrong (output equals an input, existing output without --force): exit code 2."""
