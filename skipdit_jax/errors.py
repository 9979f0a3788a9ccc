"""Errors a user can cause. The CLI prints their message as one line and exits non-zero."""


class UserError(ValueError):
    """Bad input from the user: a wrong argument, file, shape or setting."""


class ConfigError(UserError):
    """An invalid model, cache or training configuration."""


class CheckpointError(UserError):
    """A checkpoint file that cannot be read, or whose contents do not fit the model."""


class HubUnavailableError(CheckpointError, RuntimeError):
    """A `hf://` path could not be fetched (no network, offline mode, or not cached)."""
