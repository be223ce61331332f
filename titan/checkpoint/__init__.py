"""Distributed checkpoints that survive crashes, and exact resume.

- `storage`: step directories, completion markers, verification, retention (plain files);
- `states`: what a checkpoint holds, as objects DCP saves and loads in place;
- `manager`: the `Checkpointer` that saves (sync or async) and resumes a run.
"""

from titan.checkpoint.manager import Checkpointer, CheckpointError
from titan.checkpoint.states import TrainState
from titan.checkpoint.storage import MARKER, checkpoint_keys, list_steps, read_marker, verify

__all__ = [
    "MARKER",
    "CheckpointError",
    "Checkpointer",
    "TrainState",
    "checkpoint_keys",
    "list_steps",
    "read_marker",
    "verify",
]
