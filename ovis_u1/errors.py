"""The library's error classes. A leaf: it imports nothing of the pack, so every module can raise them without
an import reaching back up (``ovis_u1``, ``ovis_u1.inputs``, ``ovis_u1.model`` and ``ovis_u1.checkpoint``
re-export them where callers have always found them)."""


class OvisU1InputError(ValueError):
    """A request the model cannot serve; the message names the input and the fix."""


class CheckpointError(ValueError):
    """The checkpoint directory cannot be used as it is; the message says what to change."""
