"""The one evaluation entry point: every caller (CLI, tests, benches, demo) goes through ``evaluate``.

    from loftup.training.evaluation import evaluate, baseline, resolve_checkpoint, SegProtocol
    ups = [baseline("bilinear"), resolve_checkpoint("run2/stage2.safetensors")]
    res = evaluate("seg", ups, dataset="voc", root="VOC2012", backbone="dinov2_vits14", out="eval")
    res["bilinear"]["miou"], res["stage2"]["miou"], res["_protocol"]

The returned dict is what ``OUT/results.json`` holds: one entry per upsampler, plus ``_protocol``
(every protocol number) and ``_run`` (dataset, backbone, upsamplers, time).
"""

from __future__ import annotations

import time

from loftup.storage.errors import LoftupError
from loftup.training.evaluation.davis import DavisProtocol
from loftup.training.evaluation.masks import MasksProtocol
from loftup.training.evaluation.probe import SegProtocol
from loftup.training.evaluation.upsamplers import EvalUpsampler, unique_names

__all__ = ["TASKS", "evaluate"]

TASKS = ("seg", "davis", "masks")
_PROTOCOLS = {"seg": SegProtocol, "davis": DavisProtocol, "masks": MasksProtocol}


def _check_upsamplers(upsamplers: list[EvalUpsampler], backbone_name: str, in_dim: int) -> list[EvalUpsampler]:
    if not upsamplers:
        raise LoftupError("nothing to evaluate: pass at least one --upsampler or --checkpoint")
    ups = unique_names(upsamplers)
    for u in ups:
        if u.name.startswith("_"):
            raise LoftupError(f"upsampler names may not start with '_' ({u.name!r})")
        if u.trained_on and u.trained_on != backbone_name:
            raise LoftupError(f"checkpoint {u.source} was trained on backbone {u.trained_on!r}, not {backbone_name!r}")
        if u.projection is not None and int(u.projection.mean.shape[0]) != in_dim:
            raise LoftupError(
                f"{u.name}: its projection takes {int(u.projection.mean.shape[0])}-d features but "
                f"{backbone_name} gives {in_dim}-d"
            )
        if u.kind == "loftup":
            want = u.projection.out_dim if u.projection is not None else in_dim
            if int(u.module.dim) != want:
                raise LoftupError(
                    f"{u.name} upsamples {u.module.dim}-d features but gets {want}-d from "
                    f"{backbone_name}: use the backbone it was trained for"
                )
    return ups


def evaluate(
    task: str,
    upsamplers: list[EvalUpsampler],
    *,
    protocol=None,
    backbone="dinov2_vits14",
    weights: str | None = None,
    random_init: bool = False,
    dataset: str | None = None,
    root=None,
    train_split: str = "train",
    split: str = "val",
    store=None,
    image_ids=None,
    out=None,
    device="cpu",
    workers: int = 0,
    progress: bool = True,
    save_masks: bool = False,
) -> dict:
    """Run ``task`` (``seg``, ``davis`` or ``masks``) for every upsampler under one ``protocol``
    (``SegProtocol``/``DavisProtocol``/``MasksProtocol``; the paper's defaults when None).

    seg: ``dataset`` layout (cocostuff27, cityscapes, voc, folder) under ``root``; probes train on
    ``train_split`` and are scored on ``split``. davis: DAVIS 2017 under ``root``, ``split``.
    masks: ``store`` (an open store or its URL) and its ``image_ids``; stored features, no backbone.
    ``backbone`` is a registered name (built with ``weights``/``random_init``) or a ready
    ``Backbone`` module (reused across calls).
    With ``out``, writes results.json, results.md and pictures there.
    """
    if task not in TASKS:
        raise LoftupError(f"unknown evaluation task {task!r}; choose from {', '.join(TASKS)}")
    protocol = protocol or _PROTOCOLS[task]()
    if not isinstance(protocol, _PROTOCOLS[task]):
        raise TypeError(f"{task} takes a {_PROTOCOLS[task].__name__}, got {type(protocol).__name__}")
    from loftup.pipeline.devices import pick_device

    device = pick_device(device)
    t0 = time.time()
    net = None
    if not isinstance(backbone, str):
        net, backbone = backbone.to(device).eval(), backbone.name
    run: dict = {"backbone": backbone, "device": str(device)}
    n_classes = None
    if task == "masks":
        from loftup.storage import open_store
        from loftup.training.evaluation.masks import run_masks

        if store is None or image_ids is None:
            raise LoftupError("the masks evaluation needs a store and the image ids to score")
        store = open_store(store) if isinstance(store, str) else store
        ups = _check_upsamplers(upsamplers, backbone, store.features(backbone, protocol.res).dim)
        run |= {"store": str(store.url), "images": len(image_ids)}
        results, examples = run_masks(store, image_ids, backbone, ups, protocol, device=device, progress=progress)
    else:
        from loftup.pipeline.backbones import create_backbone

        if root is None:
            raise LoftupError(f"the {task} evaluation needs --root (the dataset folder)")
        if task == "seg":
            from loftup.training.evaluation.datasets import open_seg_dataset
            from loftup.training.evaluation.probe import run_probes

            if dataset is None:
                raise LoftupError("the seg evaluation needs --dataset (cocostuff27, cityscapes, voc or folder)")
            train = open_seg_dataset(dataset, root, train_split)
            val = open_seg_dataset(dataset, root, split)
            net = net or create_backbone(backbone, weights=weights, random_init=random_init, device=device)
            ups = _check_upsamplers(upsamplers, backbone, net.dim)
            run |= {
                "dataset": dataset,
                "root": str(root),
                "train_images": len(train),
                "val_images": len(val),
                "train_split": train_split,
                "split": split,
                "classes": len(train.classes),
            }
            n_classes = len(train.classes)
            results, examples = run_probes(
                train, val, net, ups, protocol, device=device, workers=workers, progress=progress
            )
        else:
            from pathlib import Path

            from loftup.training.evaluation.datasets import open_davis
            from loftup.training.evaluation.davis import run_davis

            sequences = open_davis(root, split)
            net = net or create_backbone(backbone, weights=weights, random_init=random_init, device=device)
            ups = _check_upsamplers(upsamplers, backbone, net.dim)
            run |= {
                "dataset": "davis2017",
                "root": str(root),
                "split": split,
                "sequences": len(sequences),
                "frames": sum(len(s.frames) for s in sequences),
            }
            masks_dir = Path(out) / "masks" if (save_masks and out is not None) else None
            results, examples = run_davis(
                sequences, net, ups, protocol, device=device, progress=progress, save_masks=masks_dir
            )
        run["weights"] = "random init" if random_init else (weights or "local cache")
    run["upsamplers"] = {u.name: u.describe() for u in ups}
    run["seconds"] = round(time.time() - t0, 2)
    payload = {**results, "_protocol": protocol.as_dict(), "_run": run}
    if out is not None:
        from loftup.training.evaluation.report import write_report

        write_report(out, task, payload, examples, n_classes=n_classes)
    return payload
