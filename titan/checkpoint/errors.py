"""The checkpoint layer's errors; each message is one line."""


class CheckpointError(RuntimeError):
    """A checkpoint on disk cannot be used (damaged, another model's, not finite)."""


class CheckpointSaveError(RuntimeError):
    """A save did not complete (no space, unwritable folder, a rank failed)."""
