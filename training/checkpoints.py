"""Resumable training checkpoints in safetensors and JSON: nothing in a run folder is ever unpickled.

    output_dir/checkpoint-N/
        trainable.safetensors   the trained weights (LoRA, abstractor, vision model), by parameter name
        optimizer.pt            the optimizer's state_dict; read back with torch.load(weights_only=True)
        rng-R.safetensors       process R's torch generator states (CPU, and each CUDA device)
        rng-R.json              process R's Python and NumPy random states
        trainer_state.json      step, scheduler and grad-scaler state; written last, so its presence means complete

The data position needs no file: the sampler's order follows from the seed and the epoch, the step gives the rest.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
TRAINABLE_WEIGHTS = "trainable.safetensors"
OPTIMIZER_STATE = "optimizer.pt"


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""


def checkpoint_step(folder: Path) -> int | None:
    suffix = folder.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if folder.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in `output_dir` (a folder without trainer_state.json is not)."""
    folders = [p for p in Path(output_dir).glob(CHECKPOINT_PREFIX + "*")
               if checkpoint_step(p) is not None and (p / TRAINER_STATE).is_file()]
    return max(folders, key=checkpoint_step, default=None)


def trainable_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in module.named_parameters() if p.requires_grad}


def _random_states() -> tuple[dict[str, torch.Tensor], dict]:
    generators = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        generators.update({f"cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return generators, {"python": [version, list(python_state), gauss],
                        "numpy": [name, keys.tolist(), position, has_gauss, cached]}


def _restore_random_states(generators: dict[str, torch.Tensor], states: dict) -> None:
    torch.set_rng_state(generators["cpu"])
    for name, state in generators.items():
        if name.startswith("cuda_") and torch.cuda.is_available():
            torch.cuda.set_rng_state(state, int(name.removeprefix("cuda_")))
    version, python_state, gauss = states["python"]
    random.setstate((version, tuple(python_state), gauss))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))


def save_training_checkpoint(accelerator, model, optimizer, scheduler, output_dir: Path, step: int, limit: int) -> Path:
    """Writes checkpoint-`step` (every process must call this) and keeps the newest `limit` checkpoints."""
    folder = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / TRAINER_STATE).unlink(missing_ok=True)  # incomplete until rewritten below
    accelerator.wait_for_everyone()
    generators, states = _random_states()
    rank = accelerator.process_index
    save_file(generators, str(folder / f"rng-{rank}.safetensors"))
    (folder / f"rng-{rank}.json").write_text(json.dumps(states))
    if accelerator.is_main_process:
        save_file(trainable_weights(accelerator.unwrap_model(model)), str(folder / TRAINABLE_WEIGHTS))
        torch.save(optimizer.state_dict(), folder / OPTIMIZER_STATE)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        state = {"global_step": step, "num_processes": accelerator.num_processes,
                 "scheduler": scheduler.state_dict(), "grad_scaler": scaler}
        partial = folder / (TRAINER_STATE + ".partial")
        partial.write_text(json.dumps(state, allow_nan=False))
        os.replace(partial, folder / TRAINER_STATE)
        older = sorted((p for p in output_dir.glob(CHECKPOINT_PREFIX + "*")
                        if p != folder and checkpoint_step(p) is not None), key=checkpoint_step)
        for stale in older[: max(0, len(older) - (limit - 1))] if limit > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def _read(folder: Path, name: str, reader):
    path = folder / name
    try:
        return reader(path)
    except Exception as error:  # any unreadable part: the message must name the file, whatever the reader raised
        raise ResumeError(
            f"cannot resume from {path}: {type(error).__name__}: {error}. Delete {folder} to resume from the "
            "checkpoint before it, or set resume: false to start over."
        ) from None


def restore_training_checkpoint(folder: Path, accelerator, model, optimizer, scheduler) -> int:
    """Restores what `save_training_checkpoint` wrote into the prepared objects; returns the step to continue from."""
    state = _read(folder, TRAINER_STATE, lambda p: json.loads(p.read_text(encoding="utf-8")))
    step = _read(folder, TRAINER_STATE, lambda _: int(state["global_step"]))
    if not (folder / TRAINABLE_WEIGHTS).is_file():
        raise ResumeError(f"{folder} has no {TRAINABLE_WEIGHTS}: it was written by an older version (pickled "
                          "accelerate state, which is never loaded). Delete it, or set resume: false to start over.")
    weights = _read(folder, TRAINABLE_WEIGHTS, lambda p: load_file(str(p)))
    parameters = dict(accelerator.unwrap_model(model).named_parameters())
    expected = {name for name, p in parameters.items() if p.requires_grad}
    if set(weights) != expected or any(weights[n].shape != parameters[n].shape for n in expected):
        raise ResumeError(f"{folder / TRAINABLE_WEIGHTS} holds other weights than this run trains (a different "
                          "base model, LoRA or tune_* setting); resume with the same config, or set resume: false.")
    with torch.no_grad():
        for name in expected:
            parameters[name].copy_(weights[name])
    _read(folder, OPTIMIZER_STATE, lambda p: optimizer.load_state_dict(
        torch.load(p, map_location="cpu", weights_only=True)))
    _read(folder, TRAINER_STATE, lambda _: scheduler.load_state_dict(state["scheduler"]))
    if accelerator.scaler is not None and state.get("grad_scaler"):
        _read(folder, TRAINER_STATE, lambda _: accelerator.scaler.load_state_dict(state["grad_scaler"]))
    rank = accelerator.process_index
    if (folder / f"rng-{rank}.json").is_file():
        generators = _read(folder, f"rng-{rank}.safetensors", lambda p: load_file(str(p)))
        states = _read(folder, f"rng-{rank}.json", lambda p: json.loads(p.read_text(encoding="utf-8")))
        _read(folder, f"rng-{rank}.json", lambda _: _restore_random_states(generators, states))
    else:
        logger.warning("%s was written by %s process(es); process %d continues with fresh random states.",
                       folder, state.get("num_processes"), rank)
    return step
