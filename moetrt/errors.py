"""User-facing errors. The CLI prints them in one line; ``--debug`` shows the traceback."""


class MoetrtError(Exception):
    """Base class of every error a user can cause (bad input, bad file, bad option)."""


class ConfigError(MoetrtError):
    """A model configuration is inconsistent (names the field, expected and got)."""


class CheckpointError(MoetrtError):
    """A checkpoint is missing, malformed or inconsistent (names the file and the tensor)."""


class KernelError(MoetrtError):
    """The kernel library is missing, stale, or a launch failed."""
