"""What every console script shares: the exit-code contract.

0 success; 1 the work ran but something failed (failed shards, ``verify`` found problems);
2 a user error (one line on stderr, or click's usage plus one line); 130 interrupted (Ctrl-C).
A traceback is printed only for a bug.
"""

from __future__ import annotations

import errno
import sys

import typer
from rich.console import Console

from loftup.storage.errors import LoftupError, error_line

console = Console(stderr=True)

INTERRUPTED = "interrupted; completed work is kept, rerun to resume"


def _click_types(name: str) -> tuple[type, ...]:
    """``name`` from every click the installed typer may use: typer >= 0.26 vendors its own copy
    (``typer._click``), older typers use the ``click`` package; match both."""
    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            mod = __import__(module, fromlist=[name])
        except ImportError:
            continue
        cls = getattr(mod, name, None)
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def run(app: typer.Typer, args: list[str] | None = None) -> None:
    """Run ``app`` and exit with its code (never returns)."""
    # standalone_mode=False so that our errors reach us unformatted; in that mode typer/click
    # *return* the code of Exit (and, on some versions, 130 for Ctrl-C) instead of exiting.
    exit_types = _click_types("Exit") + (typer.Exit,)
    abort_types = _click_types("Abort") + (typer.Abort,)
    click_errors = _click_types("ClickException")
    try:
        rv = app(args=args, standalone_mode=False)
    except KeyboardInterrupt:
        _fail(INTERRUPTED, 130)
    except LoftupError as exc:
        _fail(error_line(exc), getattr(exc, "exit_code", 2))
    except exit_types as exc:
        sys.exit(getattr(exc, "exit_code", 1))
    except abort_types as exc:
        # click turns Ctrl-C (and EOF at a prompt; we have none) into Abort.
        _fail(INTERRUPTED, 130) if isinstance(exc.__context__, KeyboardInterrupt) else _fail("aborted", 1)
    except click_errors as exc:
        exc.show()  # usage line + "Try --help" + "Error: <one line>"
        sys.exit(exc.exit_code)
    except FileNotFoundError as exc:
        _fail(error_line(exc), 2)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:  # nothing was renamed into place, so the store is consistent
            _fail(
                f"disk full while writing ({exc.filename or 'output'}); completed shards are kept, rerun to resume", 2
            )
        if exc.errno == errno.EPIPE:  # `loftup-store masks ... | head`
            sys.exit(1)
        raise
    if isinstance(rv, int) and not isinstance(rv, bool):
        if rv == 130:
            _fail(INTERRUPTED, 130)
        sys.exit(rv)
    sys.exit(0)
