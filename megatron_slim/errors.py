"""Errors that describe a problem with the user's input (reported as one clear line, not a traceback)."""


class UserError(Exception):
    """Bad input: a checkpoint, config, plan or recipe that cannot be used as given."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is incomplete, corrupt or does not match its config."""
