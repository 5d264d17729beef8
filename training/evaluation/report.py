"""What an evaluation writes: ``results.json``, ``results.md`` (the pinned protocol above one table
with every upsampler side by side) and PNGs of predictions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

__all__ = ["write_report", "markdown"]


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _colour(ids: np.ndarray, n: int) -> np.ndarray:
    from loftup.pictures import palette

    colours = np.concatenate([palette(max(n, 1)), np.zeros((1, 3), np.uint8)])  # last = ignored / background
    return colours[np.where((ids >= 0) & (ids < n), ids, n)]


def _blend(image: np.ndarray, ids: np.ndarray, n: int, background: int | None = None) -> np.ndarray:
    col = _colour(ids if background is None else np.where(ids == background, -1, ids - (ids > background)), n)
    keep = (ids >= 0) if background is None else (ids != background)
    out = image.astype(np.float32)
    out[keep] = 0.45 * out[keep] + 0.55 * col[keep]
    return out.round().astype(np.uint8)


def _j_over_f(r: dict | None) -> str:
    return "-" if r is None else f"{_fmt(r['J_mean'], 3)} / {_fmt(r['F_mean'], 3)}"


def markdown(task: str, payload: dict) -> str:
    protocol, run = payload["_protocol"], payload["_run"]
    names = [k for k in payload if not k.startswith("_")]
    lines = [f"# {task} evaluation", "", "Protocol (pinned; every upsampler below was run under it):", ""]
    lines += [f"- {k}: {v}" for k, v in protocol.items()]
    lines += [f"- {k}: {v}" for k, v in run.items() if k not in ("upsamplers",)]
    lines.append("")
    ups = run.get("upsamplers", {})

    def summary(metrics: list[str], cells) -> list[str]:
        # One row per upsampler: its scores, then how it was run, the same columns for every task.
        out = [
            "| upsampler | " + " | ".join(metrics) + " | projection | space | source |",
            "|---|" + "---:|" * len(metrics) + "---|---|---|",
        ]
        for n in names:
            d = ups.get(n, {})
            out.append(
                f"| {n} | " + " | ".join(cells(payload[n])) + f" | {d.get('projection') or '-'} | "
                f"{d.get('target_space', '-')} | {d.get('source', '')} |"
            )
        return out

    def breakdown(title: str, label: str, keys, cell) -> list[str]:
        # Upsamplers side by side, one row per class / sequence.
        if not keys:
            return []
        out = ["", title, "", f"| {label} | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        out += [f"| {k} | " + " | ".join(cell(payload[n], k) for n in names) + " |" for k in keys]
        return out

    if task == "seg":
        lines += [
            "mIoU = mean IoU over the classes that occur in the val labels or in the predictions "
            "(`classes` column); pixel accuracy over labelled pixels.",
            "",
        ]
        lines += summary(
            ["mIoU", "pixel acc.", "classes"],
            lambda r: [_fmt(r["miou"]), _fmt(r["pixel_accuracy"]), str(r["classes_scored"])],
        )
        lines += breakdown(
            "Per-class IoU:",
            "class",
            sorted({c for n in names for c in payload[n]["per_class_iou"]}),
            lambda r, c: _fmt(r["per_class_iou"].get(c)),
        )
    elif task == "davis":
        lines += [
            "J: region IoU; F: boundary F-measure; per object over the scored frames, then averaged over "
            "all objects (DAVIS 2017 toolkit).",
            "",
        ]
        lines += summary(
            ["J&F", "J", "F", "objects"],
            lambda r: [_fmt(r["JF_mean"]), _fmt(r["J_mean"]), _fmt(r["F_mean"]), str(r["objects"])],
        )
        lines += breakdown(
            "Per sequence (J / F):",
            "sequence",
            sorted({s for n in names for s in payload[n]["per_sequence"]}),
            lambda r, s: _j_over_f(r["per_sequence"].get(s)),
        )
    else:
        lines += summary(["prototype mIoU", "images"], lambda r: [_fmt(r["prototype_miou"]), str(r["images"])])
    return "\n".join(lines) + "\n"


def write_report(out, task: str, payload: dict, examples=None, n_classes: int | None = None) -> dict:
    """Write the report files under ``out``; returns their paths."""
    from loftup.pictures import save_panels

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "pictures": []}
    tmp = paths["json"].with_name("results.json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=True))
    tmp.replace(paths["json"])
    paths["markdown"].write_text(markdown(task, payload))
    if task == "seg" and examples:
        for i, (image, label, preds) in enumerate(examples):
            panels = [image, _blend(image, label, n_classes)] + [_blend(image, p, n_classes) for p in preds.values()]
            paths["pictures"].append(save_panels(panels, ["image", "ground truth", *preds], out / f"seg_{i:02d}.png"))
    elif task == "davis" and examples:
        for seq, frames in examples.items():
            for image, gt, preds in frames:
                n = int(max([gt.max()] + [p.max() for p in preds.values()])) + 1
                panels = [_blend(image, gt, n, background=0)] + [
                    _blend(image, p, n, background=0) for p in preds.values()
                ]
                k = len(paths["pictures"])
                paths["pictures"].append(
                    save_panels(panels, ["ground truth", *preds], out / f"davis_{seq}_{k:02d}.png")
                )
    return paths
