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
import typing

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


def _show_version(value: bool) -> None:
    if value:
        from loftup import __version__

        print(f"loftup {__version__}")
        raise typer.Exit()


VersionOpt = typer.Option(
    False, "--version", callback=_show_version, is_eager=True, help="Show the version and exit.", show_default=False
)

# Metavars a user reads: by option name first, else by type (typer would print <str>, <list[Path]>).
_METAVARS_BY_NAME = {"store": "STORE", "shards": "SHARDS", "sa1b_root": "DIR"}
_METAVARS_BY_TYPE = {"integer": "INTEGER", "float": "NUMBER", "text": "TEXT", "path": "PATH"}


def _metavar(param) -> str:
    if param.name in _METAVARS_BY_NAME:
        return _METAVARS_BY_NAME[param.name]
    desc = getattr(param, "type_descriptor", None)  # typer >= 0.26; older typers give click's type
    if desc is None:
        kind = getattr(getattr(param, "type", None), "name", "")
    elif desc.choices is not None:
        return "|".join(map(str, desc.choices))
    else:
        annotation = typing.get_args(desc.annotation)[0] if desc.is_list else desc.annotation
        kind = "path" if desc.is_path else {int: "integer", float: "float", str: "text"}.get(annotation, "")
    return _METAVARS_BY_TYPE.get(kind, "VALUE")


def _for_users(cmd, name: str) -> None:
    """Help for users, set once for every command of a CLI: -h beside --help, metavars a user
    reads, and docstrings' ``literal`` quoting shown as `literal`."""
    for attr in ("help", "short_help"):
        if getattr(cmd, attr, None):
            setattr(cmd, attr, getattr(cmd, attr).replace("``", "`"))
    if cmd.help and not cmd.short_help:  # the whole first paragraph in command lists, not 45 characters of it
        cmd.short_help = " ".join(cmd.help.split("\n\n")[0].split())
    ctx = cmd.context_class(cmd, info_name=name, help_option_names=["-h", "--help"])
    help_option = cmd.get_help_option(ctx)  # made once per command and kept: -h from here on
    for param in [*cmd.params, *([help_option] if help_option else [])]:
        if param.param_type_name == "argument":
            # The name says what it is (IMAGE, OUT): no <path> beside it, no {IMAGE} in the usage line.
            param.metavar = shown = param.metavar or param.name.upper()
            param.display_type_rich = lambda ctx: None
            param._usage_display_name = lambda shown=shown, required=param.required: shown if required else f"[{shown}]"
        if param.param_type_name != "option":
            continue
        if param.help:
            param.help = param.help.replace("``", "`")
        if param.is_flag:
            param.metavar = ""
        else:
            param.metavar = _metavar(param)
    for sub_name, sub in getattr(cmd, "commands", {}).items():
        _for_users(sub, sub_name)


def run(app: typer.Typer, args: list[str] | None = None) -> None:
    """Run ``app`` and exit with its code (never returns)."""
    # standalone_mode=False so that our errors reach us unformatted; in that mode typer/click
    # *return* the code of Exit (and, on some versions, 130 for Ctrl-C) instead of exiting.
    exit_types = _click_types("Exit") + (typer.Exit,)
    abort_types = _click_types("Abort") + (typer.Abort,)
    click_errors = _click_types("ClickException")
    # click's plain help: it wraps to any width, where rich's boxed panels cut option names at 80
    # columns ("--recon-uncertain…"), and it reads the same in a file.
    app.rich_markup_mode = None
    command = typer.main.get_command(app)
    _for_users(command, app.info.name or "")
    try:
        rv = command(args=args, standalone_mode=False)
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


def feature_set(store, backbone: str | None, res: int | None, strict: bool = False) -> tuple[str, int]:
    """``--backbone``/``--res`` of stored features, each defaulting to what the store holds: the
    one feature set that fits what was given; where several fit, one error lists them. Given both
    (or a backbone the store lacks), they are taken as they are unless ``strict`` (then one error
    lists the sets there are); reading them says what is missing."""
    if backbone is not None and res is not None and not strict:
        return backbone, res
    sets = [name.rsplit("@", 1) for name in store.feature_sets()]
    fits = [(b, int(r)) for b, r in sets if backbone in (None, b) and res in (None, int(r))]
    if len(fits) == 1:
        return fits[0]
    have = ", ".join(store.feature_sets()) or "none"
    if not fits:
        if strict:
            want = f"{backbone or '*'}@{res or '*'}"
            raise LoftupError(f"the store has no features {want}; it has: {have} (loftup-pipeline features makes them)")
        if backbone is not None:
            return backbone, 224 if res is None else res
        if res is None:
            raise LoftupError("the store has no features yet: run `loftup-pipeline features` first")
        raise LoftupError(f"no stored feature set fits --res {res}; the store has: {have}")
    raise LoftupError(f"the store has several feature sets ({have}): choose one with --backbone and --res")


def renamed(value, old, flag: str, old_flag: str, default=None):
    """An option and the hidden old name it replaced (kept so that scripts keep working): the old
    one when given, unless the new one was given a different value too."""
    if old is not None and value not in (None, default, old):
        raise typer.BadParameter(f"{flag} {value} and {old_flag} {old} disagree (the same option)", param_hint=flag)
    return value if old is None else old


def print_table(table, lines) -> None:
    """``table`` on stdout when it fits the width (the terminal's; COLUMNS or 80 in a file or a
    pipe), else its title, ``lines`` (one per row) and caption: nothing cut to "shar…"."""
    if stdout.measure(table, options=stdout.options.update_width(10_000)).maximum <= stdout.width:
        stdout.print(table)
        return
    for line in [table.title, *lines, table.caption]:
        if line:
            stdout.print(line, highlight=False, soft_wrap=True, markup=False)


def field_params(cls, exclude=(), optional=()) -> list:
    """One typer option per field of dataclass ``cls`` (declared with ``loftup.fields.option``: its
    help, flag, default), as keyword-only parameters for a command's signature. Fields in
    ``optional`` default to None on the command line (the command resolves them)."""
    import dataclasses
    import inspect

    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.metadata.get("cli", True):
            continue
        kind, flag = hints[f.name], f"--{f.name.replace('_', '-')}"
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...  # required
        if f.metadata.get("parse") == "ints":
            kind = typing.Optional[str]
            default = ",".join(map(str, default)) if isinstance(default, list) else default
        if f.name in optional:
            kind, default = typing.Optional[kind], None
        if kind in (bool, typing.Optional[bool]):
            flag = f"{flag}/--no-{flag[2:]}"
        flag = f.metadata.get("flag", flag)
        hidden = f.metadata.get("hidden", False)
        opt = typer.Option(default, flag, help=None if hidden else f.metadata["help"], hidden=hidden)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=kind))
    return params


def with_options(cls, name: str, exclude=(), optional=()):
    """Give a command the fields of ``cls`` as options, passed to it as one ``cls`` object in its
    parameter ``name`` (fields in ``exclude`` keep their defaults; those in ``optional`` are None
    unless given), checked (``cls.check``) first."""
    import functools
    import inspect

    def decorate(fn):
        fields = field_params(cls, exclude, optional)
        names = [p.name for p in fields]

        @functools.wraps(fn)
        def command(**kwargs):
            kwargs[name] = obj = cls(**{k: kwargs.pop(k) for k in names})
            if hasattr(obj, "check"):
                obj.check()  # before the command does anything
            return fn(**kwargs)

        hints = typing.get_type_hints(fn)  # resolved in fn's module: typer resolves in this one
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation), kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(fn).parameters.values()
        ]
        at = [p.name for p in own].index(name)  # the options are listed where their object is declared
        params = own[:at] + fields + own[at + 1 :]
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer reads __signature__, not the wrapped function's
        return command

    return decorate
