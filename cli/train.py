"""``loftup-train``: Stage 1, Stage 2, evaluation and inference.

Multi-GPU / multi-node: ``torchrun --nproc_per_node N $(which loftup-train) stage1 ...``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from loftup.cli.common import JsonOpt, VersionOpt, console, field_params, print_json, renamed, run, with_options
from loftup.cli.infer import upsample
from loftup.storage.errors import LoftupError
from loftup.training.evaluation.protocols import (
    DavisInputs,
    DavisProtocol,
    EvalOptions,
    LiveBackbone,
    MasksEvalOptions,
    MasksInputs,
    MasksProtocol,
    SegInputs,
    SegProtocol,
)

HELP = """Train LoftUp (Stage 1, Stage 2), evaluate upsamplers with the paper's probes, and upsample
images. On several GPUs or nodes: torchrun --nproc_per_node N $(which loftup-train) stage1 ..."""
app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP)


@app.callback()
def _options(version: bool = VersionOpt) -> None:
    pass


def _ints(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    from loftup.pipeline.shards import parse_shards

    return parse_shards(text)


def _summary(title: str, result: dict) -> None:
    from rich.table import Table

    t = Table(title=title)
    t.add_column("field")
    t.add_column("value", justify="right", overflow="fold")
    for k, v in result.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items())
        t.add_row(k, str(v))
    console.print(t)


def _config_command(name: str, module: str, config: str, doc: str, summary=None, from_store=(), from_init=()):
    """Register ``loftup-train NAME``: one option per field of the stage's config dataclass (declared
    once, with its help, in training/loop.py and the stage's module), then train and print a summary.
    ``from_store``: ``backbone`` and ``res`` default to the store's feature set instead;
    ``from_init``: ``backbone`` defaults to the one the ``--init`` checkpoint was trained on."""
    import importlib
    import inspect

    mod = importlib.import_module(f"loftup.training.{module}")
    cls = getattr(mod, config)
    fallback = {f.name: f.default for f in dataclasses.fields(cls)}
    parsers = {f.name: _ints for f in dataclasses.fields(cls) if f.metadata.get("parse") == "ints"}
    params = field_params(cls, optional=(*from_store, *from_init))
    for p in params:
        if p.name in from_store:
            p.default.help += f" Default: the store's feature set ({p.name} of the one there)."
        elif p.name in from_init:
            p.default.help += f" Default: the one --init was trained on, else {fallback[p.name]}."

    def command(**kwargs):
        allow_missing = kwargs.pop("allow_missing")
        kwargs = {k: parsers[k](v) if k in parsers else v for k, v in kwargs.items()}
        if from_store and None in (kwargs["backbone"], kwargs["res"]):
            from loftup.cli.common import feature_set
            from loftup.storage import open_store

            kwargs["backbone"], kwargs["res"] = feature_set(
                open_store(kwargs["store"]), kwargs["backbone"], kwargs["res"], strict=True
            )
        if from_init and kwargs["backbone"] is None:
            from loftup.training.checkpoint import load_model

            extra = load_model(kwargs["init"], with_meta=True)[1].get("extra") or {}
            kwargs["backbone"] = extra.get("backbone") or fallback["backbone"]
        if allow_missing and kwargs.get("shards"):
            kwargs["shards"] = _present(kwargs)
        result = mod.train(cls(**kwargs))
        if summary is not None:
            summary(result)
        _summary(name.replace("stage", "stage "), result)

    params.append(
        inspect.Parameter(
            "allow_missing",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(
                False,
                "--allow-missing",
                help="Train on the --shards that are finished; skip the others instead of stopping.",
            ),
        )
    )
    command.__signature__ = inspect.Signature(params)
    command.__doc__ = doc
    command.__name__ = name
    app.command(name=name)(command)


def _present(kwargs: dict) -> list[int]:
    """``--allow-missing``: the --shards the store has finished (stage 1 also needs the features)."""
    from loftup.storage.layout import job_key
    from loftup.training.data import present_shards

    jobs = ["images", "masks"] + ([job_key("features", kwargs["backbone"], kwargs["res"])] if "res" in kwargs else [])
    present, missing = present_shards(kwargs["store"], kwargs["shards"], jobs)
    if missing:
        console.print(f"[yellow]--allow-missing: training without {len(missing)} unfinished shard(s): {missing[:20]}")
    return present


def _stage2_summary(result: dict) -> None:
    result["timings"] = {k: round(v, 2) for k, v in result.get("timings", {}).items()}


_config_command(
    "stage1",
    "stage1",
    "Stage1Config",
    "Stage 1: mask-refined bicubic pseudo-GT built on the fly from stored features and masks.",
    from_store=("backbone", "res"),
)
_config_command(
    "stage2",
    "stage2",
    "Stage2Config",
    "Stage 2: self-distillation from an EMA teacher on HR crops, the VFM run live.",
    _stage2_summary,
    from_init=("backbone",),
)


evaluate_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="The paper's probes on the official dataset layouts, every upsampler under one protocol.",
)
app.add_typer(evaluate_app, name="evaluate")


def _trained_on(ups) -> Optional[str]:
    """The backbone the given checkpoints were trained for: one error line if they disagree."""
    names = sorted({u.trained_on for u in ups if u.trained_on})
    if len(names) > 1:
        raise LoftupError(f"the checkpoints were trained on different backbones ({', '.join(names)}): give --backbone")
    return names[0] if names else None


def _run_evaluation(task: str, protocol, options, as_json: bool, backbone=None, store=None, **kwargs):
    """Build the upsamplers, pick the backbone (given; else the checkpoints'; else the store's; else
    the registry default), run, print the table (or JSON) on stdout."""
    import time

    from loftup.pipeline.backbones import DEFAULT_BACKBONE
    from loftup.training.evaluation import build_upsamplers, evaluate
    from loftup.training.evaluation.report import markdown

    ups = build_upsamplers(
        list(options.upsampler),
        [str(c) for c in options.checkpoint],
        target_space=options.target_space,
        match_projection=options.match_projection,
        device="cpu",
    )
    backbone = backbone or _trained_on(ups)
    if store is not None:
        from loftup.cli.common import feature_set

        backbone, res = feature_set(store, backbone, protocol.res)
        protocol = dataclasses.replace(protocol, res=res)
        kwargs["store"] = store
    out, started = options.out, time.time()
    console.print("protocol: " + ", ".join(f"{k}={v}" for k, v in protocol.as_dict().items()))
    result = evaluate(
        task, ups, protocol=protocol, out=out, device=options.device, backbone=backbone or DEFAULT_BACKBONE, **kwargs
    )
    if as_json:
        print_json(result)
    else:
        print(markdown(task, result))
    if out is not None:
        pictures = [p for p in out.glob("*.png") if p.stat().st_mtime >= started - 1]
        console.print(
            f"wrote {out / 'results.json'}, {out / 'results.md'}"
            + (f" and {len(pictures)} pictures" if pictures else " (no pictures for this task)")
        )


# --backbone-res was the name of --res before the CLIs shared one vocabulary: still accepted, not shown.
_OLD_RES = typer.Option(None, "--backbone-res", hidden=True)


def _with_res(protocol, old: Optional[int]):
    return dataclasses.replace(protocol, backbone_res=renamed(protocol.backbone_res, old, "--res", "--backbone-res"))


def _live_task(task: str, inputs, protocol_cls, doc: str) -> None:
    """Register ``evaluate TASK`` for a task that runs the backbone live on a dataset (seg, davis)."""

    @evaluate_app.command(task, help=doc)
    @with_options(protocol_cls, "protocol")
    @with_options(EvalOptions, "options")
    @with_options(LiveBackbone, "live")
    @with_options(inputs, "data")
    def command(data, live, options, protocol, old_res: Optional[int] = _OLD_RES, as_json: bool = JsonOpt):
        _run_evaluation(
            task,
            _with_res(protocol, old_res),
            options,
            as_json,
            backbone=live.backbone,
            weights=live.weights,
            random_init=live.random_init,
            **dataclasses.asdict(data),
        )


_live_task(
    "seg",
    SegInputs,
    SegProtocol,
    "Linear-probe semantic segmentation (LoftUp's eval_seg protocol): mIoU and pixel accuracy.",
)
_live_task(
    "davis",
    DavisInputs,
    DavisProtocol,
    "DAVIS 2017 label propagation (LiFT/LoftUp protocol): J, F and J&F as the official toolkit.",
)


@evaluate_app.command("masks")
@with_options(MasksProtocol, "protocol", optional=("res",))
@with_options(MasksEvalOptions, "options")
@with_options(MasksInputs, "data")
def evaluate_masks(data: MasksInputs, options: MasksEvalOptions, protocol: MasksProtocol, as_json: bool = JsonOpt):
    """Nearest-prototype mIoU against the store's instance masks (a class-free proxy)."""
    import numpy as np

    from loftup.storage import open_store

    st = open_store(data.store)
    ids = np.concatenate([st.image_ids(s) for s in _ints(data.shards)])[: data.limit]
    _run_evaluation("masks", protocol, options, as_json, backbone=data.backbone, store=st, image_ids=ids)


@evaluate_app.command("make-tiny-data")
def evaluate_make_tiny_data(
    out: Path = typer.Argument(..., help="Folder to write."),
    layout: str = typer.Option("voc", help="cocostuff27, cityscapes, voc, folder, or davis."),
    train: int = typer.Option(8, help="Training images (segmentation layouts)."),
    val: int = typer.Option(4, help="Val images (segmentation layouts)."),
    frames: int = typer.Option(8, help="Frames per sequence (davis)."),
    seed: int = typer.Option(0, help="Crop seed."),
    photos: str = typer.Option(
        "voc", help="Labelled photos to crop (segmentation): voc, or voc,arc2017 (folder layout; per photo)."
    ),
    motions: str = typer.Option(
        "diagonal", help="Camera motions, one sequence per photo each (davis): diagonal, anti, pan, zoom."
    ),
):
    """Write a tiny dataset in an official layout from installed photos with real labels (demos, tests)."""
    from loftup.training.evaluation.datasets import make_tiny_dataset, make_tiny_davis

    path = (
        make_tiny_davis(out, frames=frames, motions=tuple(motions.split(",")))
        if layout == "davis"
        else make_tiny_dataset(layout, out, train, val, seed, photos=tuple(photos.split(",")))
    )
    console.print(f"wrote a tiny {layout} dataset to {path}")


# Inference is `loftup upsample` (cli/infer.py); this spelling stays for the scripts that use it.
app.command("upsample", hidden=True, help="The same as `loftup upsample`.")(upsample)


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
