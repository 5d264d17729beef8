"""User-facing errors: each carries one line that the CLI prints without a traceback."""


class LoftupError(Exception):
    """A problem the user can fix (bad input, wrong store, missing weights)."""


class StoreError(LoftupError):
    """The store is missing, of another schema version, or inconsistent."""


class ShardSpecError(LoftupError):
    """A shard specification such as ``0-99,120`` is malformed or names missing tars."""


class ShardError(LoftupError):
    """A whole shard cannot be processed (truncated or unreadable tar)."""


class WeightsError(LoftupError):
    """Model weights are missing or do not match the architecture."""
