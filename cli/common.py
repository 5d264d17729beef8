"""What every console script shares: the exit-code contract.

0 success; 1 the work ran but something failed (failed shards, ``verify`` found problems);
2 a user error or an error of the file system (a path, a permission, a full disk): one line on
stderr, or click's usage plus one line; 130 interrupted (Ctrl-C). A traceback is printed only
for a bug.
"""

from __future__ import annotations

import errno
import json
import math
import sys

import typer
from rich.console import Console

from loftup.storage.errors import LoftupError, error_line, os_error_in

# Results (tables, JSON) go to stdout, so that `loftup-store info | jq` works; messages and
# progress go to stderr.
console = Console(stderr=True)
stdout = Console()


JsonOpt = typer.Option(False, "--json", help="Print the result as JSON on stdout (for jq and scripts).")


def _finite(value):
    """JSON has no NaN or infinity (jq and most parsers refuse them): write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def print_json(value) -> None:
    """One JSON document on stdout (``--json``)."""
    text = json.dumps(_finite(json.loads(json.dumps(value, default=str))), indent=1, allow_nan=False)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


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


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _os_error(exc: OSError) -> None:
    """An error of the file system or the OS (a path, a permission, a full disk): one line, exit 2."""
    if exc.errno == errno.EPIPE:  # `loftup-store masks ... | head`
        sys.exit(1)
    if exc.errno in _DISK_FULL:  # writes go to temp names first, so nothing half-written is in place
        where = exc.filename or "output"
        _fail(f"disk full while writing {where}; completed work is kept: free space and rerun to resume", 2)
    _fail(error_line(exc), 2)


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
    except OSError as exc:
        _os_error(exc)
    except Exception as exc:
        # torch.save reports a failed write as RuntimeError("... unexpected pos ..."), with the
        # OSError only in the chain: a full disk is still a full disk.
        cause = os_error_in(exc, _DISK_FULL)
        if cause is None:
            raise
        _os_error(cause)
    if isinstance(rv, int) and not isinstance(rv, bool):
        if rv == 130:
            _fail(INTERRUPTED, 130)
        sys.exit(rv)
    sys.exit(0)


def feature_set(store, backbone: str | None, res: int | None) -> tuple[str, int]:
    """``--backbone``/``--res`` of stored features, each defaulting to what the store holds: the
    one feature set that fits what was given. Given both, they are taken as they are (reading
    them says what is missing); where several fit, one error lists them."""
    if backbone is not None and res is not None:
        return backbone, res
    sets = [name.rsplit("@", 1) for name in store.feature_sets()]
    fits = [(b, int(r)) for b, r in sets if backbone in (None, b) and res in (None, int(r))]
    if len(fits) == 1:
        return fits[0]
    have = ", ".join(store.feature_sets()) or "none"
    if not fits:
        if backbone is not None:
            return backbone, 224 if res is None else res
        if res is None:
            raise LoftupError("the store has no features yet: run `loftup-pipeline features` first")
        raise LoftupError(f"no stored feature set fits --res {res}; the store has: {have}")
    raise LoftupError(f"the store has several feature sets ({have}): choose one with --backbone and --res")
