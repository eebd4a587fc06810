"""User-facing errors.

Everything a user can get wrong (paths, checkpoints, prompts, images, arguments) raises
`VtpruneError` with a message that names the problem. The CLI prints such errors as one
line and exits non-zero; any other exception is a bug and keeps its traceback.
"""


class VtpruneError(ValueError):
    """Bad input: the message says what is wrong and, where it can, how to fix it."""


class CheckpointError(VtpruneError):
    """A model directory or checkpoint that cannot be used (missing files, tensors, shapes)."""
