"""The one exception type for bad user input: the CLI prints it as a one-line error, exit 2."""


class FP4KVError(ValueError):
    """Bad input the user can fix; the message names the problem and the fix."""
