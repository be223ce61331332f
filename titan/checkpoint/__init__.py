"""Distributed checkpoints that survive crashes, and exact resume.

- `storage`: step directories, completion markers, verification, retention (plain files);
- `states`: what a checkpoint holds, as objects DCP saves and loads in place;
- `manager`: the `Checkpointer` that saves (sync or async) a run;
- `resume`: checking and loading a step (a resume, or the weights alone);
- `initial`: initializing a model from another checkpoint.
"""

from titan.checkpoint.errors import CheckpointError, CheckpointSaveError
from titan.checkpoint.manager import Checkpointer
from titan.checkpoint.states import TrainState
from titan.checkpoint.storage import MARKER, checkpoint_keys, list_steps, read_marker, verify

__all__ = [
    "MARKER",
    "CheckpointError",
    "CheckpointSaveError",
    "Checkpointer",
    "TrainState",
    "checkpoint_keys",
    "list_steps",
    "read_marker",
    "verify",
]
