"""How every knob of loftup is declared: once, as a dataclass field with its help text.

The training stages (``training/loop.py``), the pipeline jobs and how they run
(``pipeline/job_options.py``, ``pipeline/options.py``), the evaluation protocols
(``training/evaluation/protocols.py``) and inference (``training/inference_options.py``) declare
their fields with :func:`option`; the command lines are generated from those declarations
(``loftup.cli.common.field_params``), so a default or a help text is never written twice. No
dependencies, so that ``--help`` needs neither torch nor Ray.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["REQUIRED", "option"]

REQUIRED = dataclasses.MISSING


def option(
    default: Any = REQUIRED,
    help: str = "",
    *,
    factory=None,
    flag: str | None = None,
    hidden: bool = False,
    cli: bool = True,
    parse: str | None = None,
    resumable: bool = False,
    **more,
):
    """A config field with its help text.

    - ``factory``: a default made fresh for each object (lists).
    - ``flag``: the option's name(s) on the command line when not ``--field-name`` (and
      ``--no-field-name`` for a bool); ``hidden``: accepted but not shown (old spellings).
    - ``cli=False``: a field the command line does not set (a protocol's description, say).
    - ``parse="ints"``: the command line takes it as text like ``0-89`` or ``224,336``.
    - ``resumable``: a training field that may differ on ``--resume`` (how long to run, logging).
    - anything else lands in the field's metadata for its reader.
    """
    meta = {"help": help, "resumable": resumable, "cli": cli, "parse": parse, "hidden": hidden, **more}
    if flag is not None:
        meta["flag"] = flag
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)
