"""One exception type for every problem a user can fix (bad input, missing files, bad config).

The CLI prints these as a single clear message with a non-zero exit, never a stack trace.
"""


class MlasLoraError(Exception):
    """A user-facing error: the message says what was wrong and what was expected."""
