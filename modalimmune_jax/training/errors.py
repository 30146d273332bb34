"""The errors a run reports to its user as one line (`cli.run_cli`), not as a traceback."""


class ConfigError(ValueError):
    """A config value, flag or path is invalid; the message names it."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite updates; the last finite params are checkpointed."""


class CheckpointError(RuntimeError):
    """No checkpoint in the workdir can be read."""


# What `cli.run_cli` turns into ``error: ...`` and exit code 2. OSError covers an unreadable or
# unwritable path (its message names the path); ValueError covers bad data files (the loaders name
# the file, split, key and shape) and ConfigError.
USER_ERRORS = (ValueError, OSError, TrainingDiverged, CheckpointError)
