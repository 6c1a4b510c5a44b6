"""The model behind the ArtQuant nodes: where checkpoints live, one copy of the weights, and ComfyUI's memory management.

Lifetime is ComfyUI's: the ARTQUANT_MODEL a loader outputs lives in ComfyUI's node cache, and this module keeps only
weak references to the weights, so "Free model and node cache" frees them. Loaders that differ only in the preset
share one copy of the weights (the preset is applied at scoring time) when the presets are of the checkpoint's family
(mPLUG-Owl2: ArtQuant, DeQA-Score, OneAlign; Qwen-VL: Q-ReAlign); a checkpoint folder whose files changed loads anew.
ComfyUI is optional: inside it the network is wrapped in a `ModelPatcher` and loaded with `load_models_gpu` (so
ComfyUI can offload it when other models need the memory); elsewhere the scorer stays where it was loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from ..scorer import PRESETS, ArtQuantScorer, CheckpointError, get_preset
from ..scorer.checkpoint import LoadedCheckpoint

log = logging.getLogger("artquant")

MODEL_FOLDER = "artquant"  # models/artquant/, also settable in extra_model_paths.yaml
FULL_CHECKPOINT_MARKER = "config.json"
LORA_RELEASE_MARKER = "adapter_config.json"
CHECKPOINT_MARKERS = (FULL_CHECKPOINT_MARKER, LORA_RELEASE_MARKER)


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


def checkpoint_folders(folders: list[Path], full_only: bool = False) -> list[str]:
    """Names of the checkpoint folders in `folders`: full checkpoints (config.json, no adapter) and, unless
    `full_only`, LoRA releases (adapter_config.json)."""
    names = set()
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            is_release = (path / LORA_RELEASE_MARKER).is_file()
            is_full = (path / FULL_CHECKPOINT_MARKER).is_file() and not is_release
            if is_full or (is_release and not full_only):
                names.add(path.name)
    return sorted(names)


def local_checkpoints(full_only: bool = False) -> list[str]:
    """Checkpoint folders in ComfyUI's models/artquant/ (the base list passes `full_only`: a base is never a release)."""
    return checkpoint_folders(model_folders(), full_only)


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


def folder_fingerprint(location: str | None) -> tuple:
    """What identifies the files of a checkpoint folder: each file's name, inode, size and mtime (a folder replaced
    under the same name, or a file rewritten in place, changes it). Hub ids and missing paths: the name itself."""
    if location is None or not os.path.isdir(location):
        return (location,)
    entries = []
    for entry in sorted(os.scandir(location), key=lambda e: e.name):
        with contextlib.suppress(OSError):
            stat = entry.stat()  # follows symlinks: a re-pointed link counts as a change
            entries.append((entry.name, stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return (os.path.realpath(location), *entries)


def release_base(model: str, default_base: str | None) -> str | None:
    """The base a local LoRA release loads on when none is chosen: the local folder it records, else the preset's
    default base (so two presets share a release's copy whenever the release names its base folder). None for
    anything that is not a local release."""
    adapter_config = os.path.join(model, LORA_RELEASE_MARKER)
    if not os.path.isfile(adapter_config):
        return None
    try:
        recorded = json.loads(Path(adapter_config).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return default_base  # the loader reports the broken file
    for candidate in (os.path.join(model, recorded), recorded) if recorded else ():
        if os.path.isdir(candidate):
            return os.path.normpath(candidate)
    return default_base or recorded


@dataclass(frozen=True)
class WeightsKey:
    """One copy of the weights per checkpoint (and its files' state), base, dtype, device and quantization."""

    model: str
    base: str | None
    fingerprint: tuple
    dtype: str
    device: str
    quantization: str


class ArtQuantNetwork(torch.nn.Module):
    """The scorer's network as ModelPatcher expects it: ModelPatcher sets `.device`, read-only on transformers models."""

    def __init__(self, network: torch.nn.Module, device: torch.device):
        super().__init__()
        self.network = network
        self.device = device


def mplug_owl2_image_tokens(config, image_config, height: int, width: int) -> tuple[int, int]:
    """Every image is cropped to one square (plus the class token); the abstractor hands the LLM a fixed number."""
    return (image_config.crop_size // config.vision_config.patch_size) ** 2 + 1, config.num_visual_tokens


def qwen_vl_image_tokens(config, image_config, height: int, width: int) -> tuple[int, int]:
    """The image keeps about its area within the pixel budget; merge x merge patches become one LLM token."""
    pixels = min(max(height * width, image_config.min_pixels), image_config.max_pixels)
    vision_tokens = pixels // image_config.patch_size**2
    return vision_tokens, vision_tokens // image_config.merge_size**2


# A preset family -> (vision-tower tokens, LLM image tokens) of one height x width image: the only sizes the families'
# configs do not name alike (transformers maps the rest: `get_text_config()`, the vision config's attribute_map).
IMAGE_TOKENS = {"mplug_owl2": mplug_owl2_image_tokens, "qwen_vl": qwen_vl_image_tokens}
TYPICAL_IMAGE_SIZE = (1024, 1024)  # what the estimate assumes when the images' size is not known yet
PROMPT_TOKENS = 64  # the prompt around the image is a few dozen tokens


def family_presets(family: str) -> str:
    return ", ".join(name for name, preset in PRESETS.items() if preset.family == family)


class LoadedWeights:
    """One loaded checkpoint: the network, tokenizer and preprocessing (shared by every preset of its family) and,
    inside ComfyUI, its ModelPatcher. Quantised (bitsandbytes) weights cannot move between devices, so their patcher
    offloads to the device they sit on: ComfyUI still counts their memory but never tries to move them."""

    def __init__(self, scorer: ArtQuantScorer, quantized: bool, name: str):
        self.checkpoint = LoadedCheckpoint(scorer.model, scorer.tokenizer, scorer.image_config, scorer.source)
        self.device, self.dtype, self.quantized, self.name = scorer.device, scorer.dtype, quantized, name
        self.family = scorer.preset.family
        self.patcher = self._make_patcher()

    def _make_patcher(self):
        model_management = comfy_module("comfy.model_management")
        model_patcher = comfy_module("comfy.model_patcher")
        if model_management is None or model_patcher is None:
            return None
        offload = self.device if self.quantized else model_management.unet_offload_device()
        network = ArtQuantNetwork(self.checkpoint.model, self.device)
        return model_patcher.ModelPatcher(network, load_device=self.device, offload_device=offload)

    def scorer(self, preset: str) -> ArtQuantScorer:
        """A scorer for `preset` on these weights (cheap: only the prompt is tokenised). Its token-id tensors are made
        outside inference mode, so the guidance node can differentiate through it. A preset of another model family
        than the weights' is refused (CheckpointError)."""
        chosen = get_preset(preset)
        if chosen.family != self.family:
            raise CheckpointError(
                f"{self.name} is loaded as a {self.family} model, but the {chosen.name} preset is of family "
                f"{chosen.family}: choose one of {family_presets(self.family)} for it, or load a {chosen.family} "
                f"checkpoint (such as {chosen.model_id}) for {chosen.name}."
            )
        with torch.inference_mode(False):
            return ArtQuantScorer.from_checkpoint(self.checkpoint, chosen, self.device, self.dtype)

    def memory_required(self, batch: int, keep_graph: bool = False, image_size: tuple[int, int] | None = None) -> int:
        """Bytes of activations to reserve beyond the weights for `batch` images of `image_size` (height, width;
        default TYPICAL_IMAGE_SIZE; only Qwen-VL's token count depends on it). The scoring forward has no KV cache;
        `keep_graph`: every layer's activations are kept for a backward pass, as guidance needs."""
        config = self.checkpoint.model.config
        vision, text = config.vision_config, config.get_text_config()
        element = torch.finfo(self.dtype).bits // 8
        image_tokens, llm_image_tokens = IMAGE_TOKENS[self.family](config, self.checkpoint.image_config,
                                                                    *(image_size or TYPICAL_IMAGE_SIZE))
        text_tokens = llm_image_tokens + PROMPT_TOKENS
        vision_layer = image_tokens * (vision.hidden_size * 4 + vision.intermediate_size) + vision.num_attention_heads * image_tokens**2
        text_layer = text_tokens * (text.hidden_size * 4 + text.intermediate_size * 3) + text.num_attention_heads * text_tokens**2
        per_image = (vision_layer + text_layer) * element
        if keep_graph:
            per_image *= vision.num_hidden_layers + text.num_hidden_layers
        return batch * per_image + batch * text.vocab_size * 4  # + the fp32 logits row


class WeightsCache:
    """Weak references to every loaded copy: it never keeps weights alive, it only lets a second loader with the same
    checkpoint (say, another preset) share the copy that ComfyUI's node cache holds."""

    def __init__(self):
        self._copies: weakref.WeakValueDictionary[WeightsKey, LoadedWeights] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Copies alive now (an entry whose weights were just freed may linger in the dictionary for a moment)."""
        return sum(1 for _ in self._copies.values())

    def get(self, key: WeightsKey, load) -> LoadedWeights:
        with self._lock:
            weights = self._copies.get(key)
            if weights is None:
                weights = load()
                self._copies[key] = weights
                weakref.finalize(weights, self._released, weights.name)
                log.info("ArtQuant: loaded %s (%d copies held)", weights.name, len(self))
            return weights

    def _released(self, name: str) -> None:
        log.info("ArtQuant: released %s (%d copies held)", name, len(self))


WEIGHTS = WeightsCache()


class ArtQuantModel:
    """What flows along an ARTQUANT_MODEL link: shared weights plus the preset they score with."""

    def __init__(self, weights: LoadedWeights, preset: str = "artquant"):
        self.weights = weights
        self.scorer = weights.scorer(preset)

    @classmethod
    def from_scorer(cls, scorer: ArtQuantScorer, quantized: bool = False) -> ArtQuantModel:
        """Wraps an already loaded scorer (its weights are not shared with the cache)."""
        return cls(LoadedWeights(scorer, quantized, scorer.source), scorer.preset.name)

    @property
    def patcher(self):
        return self.weights.patcher

    def ready(self, batch: int = 1, keep_graph: bool = False,
              image_size: tuple[int, int] | None = None) -> ArtQuantScorer:
        """The scorer with its weights on the compute device and room reserved for `batch` images of `image_size`
        (height, width) (ComfyUI may have offloaded the weights since the last run)."""
        if self.patcher is not None:
            # Full load: the network's plain torch layers cannot run with weights left on the offload device.
            memory = self.weights.memory_required(batch, keep_graph, image_size)
            model_management = comfy_module("comfy.model_management")
            model_management.load_models_gpu([self.patcher], memory_required=memory, force_full_load=True)
        return self.scorer


def quantization_choices() -> list[str]:
    """8-bit/4-bit loading is offered only where bitsandbytes is installed."""
    import importlib.util

    return ["none", "8bit", "4bit"] if importlib.util.find_spec("bitsandbytes") is not None else ["none"]


def compute_device(device: str) -> str | None:
    """"auto" -> ComfyUI's compute device inside ComfyUI, else the scorer's default (a GPU when there is one)."""
    if device != "auto":
        return device
    model_management = comfy_module("comfy.model_management")
    return str(model_management.get_torch_device()) if model_management is not None else None


def load_model(model: str, base: str | None, preset: str, dtype: str, device: str, quantization: str = "none") -> ArtQuantModel:
    """An ARTQUANT_MODEL for `preset` on the weights of `model`: the copy already held when there is one for the same
    checkpoint files, base, dtype, device and quantization, else a fresh load."""
    chosen_preset = get_preset(preset)  # an unknown preset fails before any loading
    device = compute_device(device)
    key = WeightsKey(model, base or release_base(model, chosen_preset.base_id), folder_fingerprint(model), dtype,
                     str(device), quantization)

    def load() -> LoadedWeights:
        quantized = quantization != "none"
        # Outside inference mode (ComfyUI executes nodes inside it): the guidance node takes gradients through them.
        with torch.inference_mode(False):
            scorer = ArtQuantScorer.from_pretrained(
                model, base=base, preset=preset, dtype=None if dtype == "auto" else dtype, device=device,
                quantization=quantization if quantized else None,
            )
        return LoadedWeights(scorer, quantized, os.path.basename(model.rstrip("/\\")) or model)

    return ArtQuantModel(WEIGHTS.get(key, load), preset)
