"""What every console script shares: user errors become one stderr line and exit code 2."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from loftup.storage.errors import LoftupError

console = Console(stderr=True)


def run(app: typer.Typer) -> None:
    try:
        app(standalone_mode=False)
    except LoftupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as exc:
        print(f"error: {exc.strerror}: {exc.filename}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        if exc.errno == 28:  # ENOSPC: nothing was renamed into place, so the store is consistent
            print(f"error: disk full while writing ({exc.filename or 'output'}); completed shards are kept, rerun to resume", file=sys.stderr)
            sys.exit(2)
        raise
    except KeyboardInterrupt:
        print("interrupted; completed shards are kept, rerun to resume", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:  # click usage errors come through here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
