"""The one exception type for user mistakes.

Anything the user can fix (a bad path, a wrong size, an unknown sampler, a checkpoint that does
not fit) raises `SdtorchError` with a one-line message saying what is wrong and what is accepted.
The CLI prints that line and exits non-zero, without a traceback; bugs stay ordinary exceptions.
"""


class SdtorchError(Exception):
    """A user-facing error: its message is one line that says what is wrong and what is accepted."""


class CheckpointError(SdtorchError):
    """A checkpoint file or folder that cannot be loaded (missing, corrupt, hostile or mismatched)."""
