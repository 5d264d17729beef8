"""The one training loop both stages share, and the configuration they declare.

Read top to bottom: set up (devices, run directory, seed) -> build the stage's recipe (data,
models, optimizer) -> resume -> loop (batch, learning rate, loss terms, backward, clip, step,
after-step hook, log, checkpoint) -> export. A stage is a small recipe object (see `Recipe`):
it builds its parts, computes one step's loss terms, hands out its state and exports its weights.

Every configuration field is declared once, with its help text (`option`); the command line
(`loftup.cli.train`) derives its options from these declarations. Fields whose default is
``None`` and that appear in a stage's ``RECIPES`` table take the chosen recipe's value
(``--recipe released`` by default, ``--recipe paper`` for the paper's plain losses); a value
given explicitly wins.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator, Protocol

import torch

from loftup import chaos
from loftup.fields import option
from loftup.storage.errors import LoftupError
from loftup.training import distributed, memory
from loftup.training.run_dir import RunDir, seed_all, set_rng_state


@dataclass(kw_only=True)
class TrainConfig:
    """Fields both stages share. Each stage adds its own below a subclass."""

    store: str = option(help="Store written by loftup-pipeline.")
    out: str = option(help="Run directory: config.json, metrics.jsonl, last.pt, <stage>.safetensors.")
    recipe: str = option(
        "released", help="released (the authors' training code, default) or paper (the paper's main loss alone)."
    )
    backbone: str = option("dinov2_vits14", help="Backbone whose features are upsampled.")
    weights: str | None = option(None, help="Backbone weights file (when the backbone runs live).")
    random_init: bool = option(False, help="Random backbone weights (tests and demos).")
    max_masks: int = option(150, help="Masks per image, in annotation order.")
    batch_size: int = option(8, help="Global batch size (split across ranks).")
    epochs: int = option(1, help="Epochs over the store.", resumable=True)
    max_steps: int | None = option(None, help="Stop after this many steps (overrides epochs).", resumable=True)
    lr_schedule: str = option("constant", help="constant (released) or cosine (decays to 0 over decay_steps).")
    warmup_steps: int = option(0, help="Linear warm-up steps before the schedule.")
    decay_steps: int | None = option(
        None, help="Cosine horizon in steps (default: this run's steps; set it when a run will be resumed longer)."
    )
    grad_clip: float | None = option(
        None, help="Gradient-norm clip (released: 1e-4, for the first clip_steps steps only; 0 = off)."
    )
    clip_steps: int | None = option(None, help="Clip only the first N steps (released: 10; 0 = every step).")
    tv_weight: float | None = option(None, help="Total-variation weight (FeatUp TV).")
    recon_weight: float | None = option(None, help="FeatUp multi-view reconstruction weight (runs the backbone live).")
    recon_jitters: int | None = option(None, help="Jittered views per step for the reconstruction.")
    recon_uncertainty: bool | None = option(
        None, help="Reconstruction as a Gaussian NLL with a learned uncertainty (FeatUp's ScaleNet)."
    )
    max_pad: int = option(8, help="Reconstruction jitter: reflect-pad up to N px (of the backbone input) per side.")
    max_zoom: float = option(0.1, help="Reconstruction jitter: zoom 1 +/- this per axis.")
    proj_dim: int = option(64, help="Dims of the fresh random projection of the losses.")
    proj_unit: bool | None = option(
        None, help="Random projection with unit-norm columns (released) instead of N(0, 1/dim) entries."
    )
    shards: list[int] | None = option(None, help="Train on these shards only, e.g. '0-89'.", parse="ints")
    seed: int = option(0, help="Seed for init, data order, projections and jitters.")
    workers: int = option(2, help="DataLoader workers per rank.", resumable=True)
    checkpoint_every: int = option(200, help="Write last.pt every N steps.", resumable=True)
    log_every: int = option(10, help="Log metrics every N steps.", resumable=True)
    device: str = option("auto", help="auto, cpu or cuda.", resumable=True)
    resume: bool = option(
        False, help="Continue exactly from OUT/last.pt (the config must match the run's).", resumable=True
    )
    overwrite: bool = option(
        False, help="Start afresh in an OUT that holds a run (its last.pt and metrics are discarded).", resumable=True
    )
    auto_resume: bool = option(
        False,
        help="Continue from OUT/last.pt when it exists, else start fresh: for a launch that torchrun "
        "--max-restarts or a scheduler repeats after a node failure (OUT must be shared by all nodes).",
        resumable=True,
    )
    progress: bool = option(True, help="Show a progress bar.", resumable=True, cli=False)
    max_memory: float | None = option(
        None,
        help="Peak memory budget in GiB (default: the device's memory less 10%; on a CPU, this process's plus what "
        "the host has available, less 10%). Picks the plain path when its estimate fits, else the bounded one "
        "(tiles recomputed in backward: same gradients, about 2x the time); a step that fits neither is refused "
        "before it starts.",
        resumable=True,
    )
    memory_path: str = option(
        "auto", help="auto (plain when it fits --max-memory, else bounded), plain or bounded.", resumable=True
    )
    micro_batch: int | None = option(
        None,
        help="Run each step as groups of N images with accumulated gradients (only when asked). Micro-batches "
        "change BatchNorm statistics (each group is normalised with its own, and updates the running ones).",
    )


# The recipes' values of the fields both stages share: (released, paper). The released recipe is the
# authors' training code; the paper's is its main loss alone.
RECIPE_NAMES = ("released", "paper")
_SHARED_RECIPE_ROWS = dict(
    recon_weight=(1.0, 0.0),
    recon_uncertainty=(True, False),
    proj_unit=(True, False),
    grad_clip=(1e-4, 0.0),
    clip_steps=(10, 0),
)


def recipe_table(**rows: tuple) -> dict[str, dict]:
    """A stage's RECIPES from one row per field, ``field=(released, paper)``, plus the rows both
    stages share: ``{recipe: {field: value}}``."""
    rows = {**_SHARED_RECIPE_ROWS, **rows}
    return {name: {k: v[i] for k, v in rows.items()} for i, name in enumerate(RECIPE_NAMES)}


def resolve(cfg: TrainConfig, recipes: dict[str, dict]) -> TrainConfig:
    """Fill the fields left at None from the recipe's table; explicit values win."""
    if cfg.recipe not in recipes:
        raise LoftupError(f"unknown recipe {cfg.recipe!r}; choose from {', '.join(recipes)}")
    table = recipes[cfg.recipe]
    return dataclasses.replace(cfg, **{k: v for k, v in table.items() if getattr(cfg, k) is None})


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """Fields (not marked resumable) whose value differs from a run's saved config."""
    out = []
    for f in fields(cfg):
        if f.metadata.get("resumable") or f.name not in saved:
            continue
        now = json.loads(json.dumps(getattr(cfg, f.name), default=str))
        if saved[f.name] != now:
            out.append(f"{f.name} ({saved[f.name]!r} -> {now!r})")
    return out


def check_optimizer(cfg: TrainConfig) -> None:
    """Refuse, in one line, values the optimizer would reject with a traceback (or silently misuse)."""
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise LoftupError(f"--lr must be a positive number, got {cfg.lr}")
    decay = getattr(cfg, "weight_decay", 0.0)
    if not (math.isfinite(decay) and decay >= 0):
        raise LoftupError(f"--weight-decay must be >= 0, got {decay}")
    if cfg.warmup_steps < 0:
        raise LoftupError(f"--warmup-steps must be >= 0, got {cfg.warmup_steps}")
    learning_rate(cfg, 0, 1)  # the schedule's name


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The rate for optimizer step ``step`` (0-based): a pure function of the step, so a resumed
    run continues the schedule exactly."""
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise LoftupError(f"lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, (cfg.decay_steps or total_steps) - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))


def clips_at(cfg: TrainConfig, step: int) -> bool:
    return bool(cfg.grad_clip) and (not cfg.clip_steps or step < cfg.clip_steps)


class Recipe(Protocol):
    """What a stage gives the loop."""

    name: str  # "stage1" / "stage2": the run's exported file is <name>.safetensors
    optimizer: torch.optim.Optimizer
    params: list  # every trained parameter (clipped together)
    synced_params: list  # trained parameters outside the DDP-wrapped model (gradients averaged by hand)
    per_rank: int
    steps_per_epoch: int
    info: dict  # extra entries for config.json

    def batches(self, epoch: int, offset: int, step: int) -> Iterator: ...
    def step(self, batch, step: int) -> dict[str, torch.Tensor]: ...
    def after_step(self, step: int) -> None: ...
    def state(self) -> dict: ...
    def load_state(self, state: dict) -> None: ...
    def export(self, run: RunDir, step: int) -> str: ...


def train(cfg: TrainConfig, build, recipes: dict[str, dict]) -> dict:
    """Run one stage: ``build(cfg, dist) -> Recipe``. Returns a summary dict."""
    threads = torch.get_num_threads()  # the run may lower it (distributed.cpu_threads); the caller's comes back
    try:
        return _train(cfg, build, recipes)
    except RuntimeError as exc:
        lost = distributed.lost_peer(exc)
        if lost is None:
            raise
        raise lost from None
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, build, recipes: dict[str, dict]) -> dict:
    cfg = resolve(cfg, recipes)
    d = distributed.setup(cfg.device)
    distributed.cpu_threads(d, cfg.workers)
    if cfg.auto_resume and not cfg.resume:
        # Rank 0's view decides for every rank: ranks that disagreed would train different models.
        has_state = distributed.broadcast_flag((Path(cfg.out) / "last.pt").is_file(), d)
        cfg = dataclasses.replace(cfg, resume=has_state)
    seed_all(cfg.seed)
    check_optimizer(cfg)  # a bad rate or schedule fails before any work
    if cfg.resume:
        saved = RunDir.read_config(cfg.out)
        diff = config_differences(saved, cfg)
        if diff:
            raise LoftupError(f"--resume: the config differs from the run's saved config in {', '.join(diff)}")
        if saved.get("world_size", d.world) != d.world:
            raise LoftupError(
                f"--resume: the run was trained on {saved['world_size']} processes and this launch has {d.world}; "
                f"last.pt's data position is per process, so relaunch with {saved['world_size']} (nodes x processes)"
            )
    else:
        # --auto-resume that found no last.pt: a relaunch after a kill before the first checkpoint
        # starts afresh instead of being refused. Only the refusal here (master=False: nothing is
        # made or removed); the discard waits until the memory plan has passed.
        RunDir(cfg.out, master=False).start_fresh(discard=cfg.overwrite or cfg.auto_resume)

    recipe: Recipe = build(cfg, d)
    total_steps = cfg.max_steps or cfg.epochs * recipe.steps_per_epoch
    # Known before the first step, and refused before anything is written (training/memory.py).
    recipe.plan = memory.plan_for(recipe, cfg, d)
    run = RunDir(cfg.out, master=d.master)
    if not cfg.resume:
        run.start_fresh(discard=cfg.overwrite or cfg.auto_resume)
    if d.master:
        from rich.console import Console

        Console(stderr=True).print(memory.memory_line(recipe.plan), highlight=False, soft_wrap=True)

    step, epoch, offset = 0, 0, 0
    if cfg.resume:
        state = run.load_state()  # every rank reads the same file; the data order is derived, not stored
        recipe.load_state(state)
        step, epoch, offset = state["step"], state["epoch"], state["offset"]
        set_rng_state(state["rng"])
    # What the recipe resolved for a field left to it (e.g. the target space) is kept apart, so a
    # resume compares the options as given, not their resolution.
    given = asdict(cfg)
    info = {k: v for k, v in recipe.info.items() if k not in given}
    resolved = {k: v for k, v in recipe.info.items() if k in given}
    run.save_config(
        {
            "stage": recipe.name,
            **given,
            "world_size": d.world,
            "total_steps": total_steps,
            **info,
            "resolved": resolved,
            "memory": recipe.plan.describe(),
        }
    )
    meter = memory.PeakMeter(d.device)

    saved_at = step if cfg.resume else -1  # the step last.pt holds

    def checkpoint():
        nonlocal saved_at
        run.save_state({**recipe.state(), "step": step, "epoch": epoch, "offset": offset})
        saved_at = step

    from loftup.training.progress import TrainProgress

    batches = recipe.batches(epoch, offset, step)
    progress = TrainProgress(recipe.name, total_steps, start=step, enabled=cfg.progress and d.master)
    last, t_last, seen_last = {}, time.time(), 0
    while step < total_steps:
        try:
            batch = next(batches)
        except StopIteration:
            epoch, offset = epoch + 1, 0
            batches = recipe.batches(epoch, offset, step)
            batch = next(batches)
        offset += recipe.per_rank
        chaos.trace_samples(batch, step, epoch, d.rank)
        lr = learning_rate(cfg, step, total_steps)
        for group in recipe.optimizer.param_groups:
            group["lr"] = lr

        terms, loss, grad_norm = train_step(recipe, cfg, batch, step, d)
        step += 1
        recipe.after_step(step)

        seen_last += cfg.batch_size
        if step % cfg.log_every == 0 or step == total_steps:
            now = time.time()
            last = {k: distributed.all_mean(v.item(), d) for k, v in terms.items()}
            last |= {
                "step": step,
                "epoch": epoch,
                "loss": sum(last.values()),
                "lr": lr,
                "samples_per_s": seen_last / max(now - t_last, 1e-9),
            }
            if grad_norm is not None:
                last["grad_norm"] = float(grad_norm)
            last["peak_memory_gib"] = round(meter.peak() / memory.GIB, 3)
            run.log(last)
            t_last, seen_last = now, 0
        progress.update(step, loss=loss.item())
        if step % cfg.checkpoint_every == 0 or step == total_steps:
            checkpoint()
    progress.close()

    if d.master and saved_at != step:
        checkpoint()
    peak = meter.peak()
    mem = {**recipe.plan.describe(), "measured_peak_gib": round(peak / memory.GIB, 3)}
    path = recipe.export(run, step)
    run.close()
    distributed.cleanup(d)
    return {"steps": step, "epochs": epoch, "last": last, "checkpoint": path, **recipe.info, "memory": mem}


def train_step(recipe: Recipe, cfg: TrainConfig, batch, step: int, d) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
    """One optimizer step: (terms, loss, gradient norm when clipped). The benches time this."""
    recipe.optimizer.zero_grad(set_to_none=True)
    terms = recipe.step(batch, step)
    loss = sum(terms.values())
    t = time.perf_counter()
    grad_norm = optimize(recipe, cfg, loss, step, d)
    timings = getattr(recipe, "timings", None)  # a recipe that splits its step's time (Stage 2)
    if timings is not None:
        timings["backward"] = timings.get("backward", 0.0) + time.perf_counter() - t
    return terms, loss, grad_norm


def optimize(recipe: Recipe, cfg: TrainConfig, loss: torch.Tensor, step: int, d) -> torch.Tensor | None:
    """Backward (unless the step ran its own: the bounded path and micro-batches return detached
    terms), gradient sync of the parameters DDP does not average, clip (when due), optimizer
    step. Returns the gradient norm when it was clipped."""
    if loss.requires_grad:
        loss.backward()
    if d.enabled:
        # the bounded path runs the model outside DDP's hooks: every gradient is averaged here
        bounded = getattr(getattr(recipe, "plan", None), "path", "plain") == "bounded"
        _average_gradients(recipe.params if bounded else recipe.synced_params, d)
    grad_norm = torch.nn.utils.clip_grad_norm_(recipe.params, cfg.grad_clip) if clips_at(cfg, step) else None
    recipe.optimizer.step()
    return grad_norm


def _average_gradients(params: list, d) -> None:
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(d.world)
