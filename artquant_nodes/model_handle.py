"""The model handle behind the ArtQuant nodes: where checkpoints live, loading once, and ComfyUI's memory management.

ComfyUI is optional here: inside ComfyUI the scorer's network is wrapped in a `ModelPatcher` and loaded with
`load_models_gpu`, so ComfyUI can offload it when other models need the VRAM; elsewhere (tests, scripts) the
scorer simply stays on the torch device it was loaded to.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch

from ..scorer import ArtQuantScorer, CheckpointError

MODEL_FOLDER = "artquant"  # models/artquant/, also settable in extra_model_paths.yaml
CHECKPOINT_MARKERS = ("config.json", "adapter_config.json")


def comfy_module(name: str):
    """The ComfyUI module `name` when running inside ComfyUI, else None.

    ComfyUI imports these before it loads custom nodes; importing them anywhere else would parse the host's argv.
    """
    return sys.modules.get(name)


def register_model_folder() -> None:
    """Adds models/artquant/ to ComfyUI's folder_paths (no-op outside ComfyUI); extra_model_paths.yaml entries stay."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is not None:
        folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))


def model_folders() -> list[Path]:
    """The folders searched for checkpoints: ComfyUI's registered `artquant` paths (none outside ComfyUI)."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is None or MODEL_FOLDER not in folder_paths.folder_names_and_paths:
        return []
    return [Path(p) for p in folder_paths.get_folder_paths(MODEL_FOLDER)]


def local_checkpoints() -> list[str]:
    """Names of the checkpoint folders (a config.json or a LoRA release's adapter_config.json) in the model folders."""
    names = set()
    for folder in model_folders():
        if folder.is_dir():
            names.update(p.name for p in folder.iterdir() if any((p / m).is_file() for m in CHECKPOINT_MARKERS))
    return sorted(names)


def resolve_checkpoint(name: str) -> str:
    """A checkpoint name from the model folders -> its path; anything else (a path or Hugging Face id) as given."""
    name = name.strip()
    for folder in model_folders():
        if name and (folder / name).is_dir():
            return str(folder / name)
    if name and "/" not in name and os.sep not in name and not os.path.isdir(name):
        folders = ", ".join(map(str, model_folders())) or "models/artquant/"
        raise CheckpointError(
            f"There is no checkpoint folder {name!r} in {folders}. Put the model's folder there and refresh, "
            "or type its Hugging Face id (owner/name) or full path into model_id."
        )
    if os.path.isdir(name) and not any(os.path.isfile(os.path.join(name, m)) for m in CHECKPOINT_MARKERS):
        raise CheckpointError(
            f"{name} holds no checkpoint (no config.json or adapter_config.json). Put one checkpoint folder per model "
            "into models/artquant/ (e.g. models/artquant/ArtQuant/ with config.json and the weights)."
        )
    if not name:
        folders = ", ".join(map(str, model_folders())) or "models/artquant/"
        raise CheckpointError(
            f"No ArtQuant model chosen and none found in {folders}. Download a checkpoint folder (e.g. "
            "`hf download Liuuuu123/ArtQuant`) into models/artquant/ and refresh, or type a Hugging Face id."
        )
    return name


class ArtQuantNetwork(torch.nn.Module):
    """The scorer's network as ModelPatcher expects it: ModelPatcher sets `.device`, read-only on transformers models."""

    def __init__(self, network: torch.nn.Module, device: torch.device):
        super().__init__()
        self.network = network
        self.device = device


class ArtQuantModel:
    """What flows along an ARTQUANT_MODEL link: the scorer and, inside ComfyUI, its ModelPatcher (not for
    bitsandbytes-quantised models, whose weights cannot be moved between devices)."""

    def __init__(self, scorer: ArtQuantScorer, quantized: bool = False):
        self.scorer = scorer
        self.patcher = None if quantized else self._make_patcher(scorer)

    @staticmethod
    def _make_patcher(scorer: ArtQuantScorer):
        model_management = comfy_module("comfy.model_management")
        model_patcher = comfy_module("comfy.model_patcher")
        if model_management is None or model_patcher is None:
            return None
        network = ArtQuantNetwork(scorer.model, scorer.device)
        return model_patcher.ModelPatcher(network, load_device=scorer.device, offload_device=model_management.unet_offload_device())

    def ready(self) -> ArtQuantScorer:
        """The scorer with its weights on the compute device (ComfyUI may have offloaded them since the last run)."""
        if self.patcher is not None:
            # Full load: the network's plain torch layers cannot run with weights left on the offload device.
            comfy_module("comfy.model_management").load_models_gpu([self.patcher], force_full_load=True)
        return self.scorer


def quantization_choices() -> list[str]:
    """8-bit/4-bit loading is offered only where bitsandbytes is installed."""
    import importlib.util

    return ["none", "8bit", "4bit"] if importlib.util.find_spec("bitsandbytes") is not None else ["none"]


@functools.lru_cache(maxsize=2)
def load_model(model: str, base: str | None, preset: str, dtype: str, device: str, quantization: str = "none") -> ArtQuantModel:
    """Loads a scorer once per distinct setting; later executions get the cached handle (two kept at most)."""
    device = None if device == "auto" else device
    if device is None and comfy_module("comfy.model_management") is not None:
        device = comfy_module("comfy.model_management").get_torch_device()
    quantization = None if quantization == "none" else quantization
    scorer = ArtQuantScorer.from_pretrained(
        model, base=base, preset=preset, dtype=None if dtype == "auto" else dtype, device=device, quantization=quantization
    )
    return ArtQuantModel(scorer, quantized=quantization is not None)
