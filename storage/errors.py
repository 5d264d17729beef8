"""User-facing errors: each carries one line that the CLI prints without a traceback."""

import re


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


def os_error_in(exc: BaseException | None, errnos=None) -> OSError | None:
    """The first OSError (with one of ``errnos``, if given) in ``exc``'s chain of causes: torch
    reports a failed write as a RuntimeError whose context holds the OSError."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None and (errnos is None or exc.errno in errnos):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def error_line(exc: BaseException, limit: int = 300) -> str:
    """One line for an exception: a LoftupError's own message, else ``Type: first line``.

    The single home for turning exceptions into the one-line messages that the CLI prints,
    failed shards record and ``verify`` reports.
    """
    text = _ANSI.sub("", str(exc)).strip()  # torch colours some messages
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    if first.startswith("Caught ") and "Original Traceback" in text:
        # torch's DataLoader re-raises a worker's error with its traceback as the message:
        # the worker's own error is the last line, "module.Type: message".
        first = lines[-1].split(": ", 1)[-1] if isinstance(exc, LoftupError) else lines[-1]
    from loftup.storage.redact import redact_text

    if isinstance(exc, LoftupError):
        line = first
    elif isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        line = f"{exc.strerror}: {exc.filename}"
    else:
        line = f"{type(exc).__name__}: {first}".rstrip(": ")
    return redact_text(line)[:limit]


class ClusterError(LoftupError):
    """The cluster failed under a running job (head node lost, no node left that can run the
    tasks): one line like any LoftupError, but exit code 1, since the user's input was fine."""

    exit_code = 1


class NotInStore(StoreError, KeyError):
    """An image, shard or feature set the store does not hold (also a KeyError for lookups)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
