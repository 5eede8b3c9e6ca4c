"""One exception type for every problem a user can fix (bad input, missing files, bad config).

The CLI prints these as a single clear message with a non-zero exit, never a stack trace; an OSError
(a full disk, a read-only folder) gets the same one line, naming its path (`os_error_message`).
"""

import errno


class MlasLoraError(Exception):
    """A user-facing error: the message says what was wrong and what was expected."""


def config_error(problems: list[str]) -> MlasLoraError:
    """One error for every problem of a config: one line for one problem, else one line each."""
    if len(problems) == 1:
        return MlasLoraError(f"invalid config: {problems[0]}")
    return MlasLoraError("invalid config:\n  - " + "\n  - ".join(problems))


OS_ERRORS = {
    errno.ENOSPC: "no space left on the device: free some and run the command again (finished stages are kept)",
    errno.EDQUOT: "disk quota exceeded: free some space and run the command again",
    errno.EROFS: "on a read-only file system: choose a writable folder (output_dir)",
    errno.EACCES: "permission denied: choose a folder you may write to",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a file is in the way where a folder is expected",
    errno.EEXIST: "exists already, and is not a folder",
    errno.EISDIR: "is a folder, expected a file",
    errno.ENAMETOOLONG: "a file name too long for the file system",
    errno.ENOENT: "no such file or folder",
}
"""What an OSError means to a user, by errno (`os_error_message`)."""


def os_error_message(err: OSError) -> str:
    """One line for an OSError: the path it names and what was wrong (the CLI's `mlas-lora: error:`)."""
    what = OS_ERRORS.get(err.errno) or err.strerror or str(err) or type(err).__name__
    if err.filename is None:
        return f"{what} ({type(err).__name__})"
    target = f" -> {err.filename2}" if err.filename2 is not None else ""
    return f"{err.filename}{target}: {what}"
