"""Finding and loading mPLUG-Owl2 checkpoints: full ones, ArtQuant LoRA releases, and `artquant convert` output.

A local folder and a Hugging Face id take the same path (`from_pretrained`, `hf_hub_download`), which downloads
only the files needed. Pickled files are only ever read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

from .configuration_mplug_owl2 import MplugOwl2Config
from .modeling_mplug_owl2 import MPLUGOwl2LlamaForCausalLM
from .preprocessing import ImageProcessingConfig
from .tokenizer import PromptTokenizer

# The fully trained vision tower + abstractor of a LoRA release: ours in safetensors, else the reference's pickle.
NON_LORA_WEIGHTS = ("non_lora_trainables.safetensors", "non_lora_trainables.bin")
ADAPTER_CONFIG = "adapter_config.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or not an mPLUG-Owl2 checkpoint; the message says what to do."""


@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module
    tokenizer: PromptTokenizer
    image_config: ImageProcessingConfig
    source: str


def _download_hint(repo: str, filename: str) -> str:
    return (
        f"Download it with `hf download {repo}` on a machine with internet access and pass the downloaded folder "
        f"instead of the id, or copy the Hugging Face cache ({constants.HF_HUB_CACHE}) to this machine."
    )


def find_file(location: str | os.PathLike, filename: str, required: bool = True) -> Path | None:
    """`filename` inside a local folder or a Hugging Face repository (downloaded into the HF cache)."""
    location = str(location)
    if os.path.isdir(location):
        path = Path(location, filename)
        if path.is_file():
            return path
        if required:
            raise CheckpointError(f"{path} is missing. Put the checkpoint's {filename} into {location}.")
        return None
    if os.path.exists(location) or location.startswith((".", "/", "~")) or location.count("/") != 1:
        raise CheckpointError(
            f"{location!r} is neither a checkpoint folder nor a Hugging Face id (owner/name). "
            "Check the path; a folder must contain config.json and the weights."
        )
    try:
        return Path(hf_hub_download(location, filename))
    except (LocalEntryNotFoundError, HfHubHTTPError) as error:
        # Offline, unreachable or private: a subclass of EntryNotFoundError too, so it is caught first.
        if isinstance(error, EntryNotFoundError) and not isinstance(error, LocalEntryNotFoundError):
            if required:
                raise CheckpointError(f"The Hugging Face repository {location} has no file {filename}.") from None
            return None
        raise CheckpointError(
            f"Could not get {filename} of {location} ({type(error).__name__}: {error}). {_download_hint(location, filename)}"
        ) from error
    except OSError as error:
        raise CheckpointError(f"Could not get {filename} of {location}: {error}. {_download_hint(location, filename)}") from error


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors or pickled state dict, the latter through `torch.load(weights_only=True)` only."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"Could not read {path}: {error}. The file is corrupt or incomplete (or not a plain tensor file): "
            "delete it and download it again."
        ) from error


def _default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_device_and_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """`device` None: the first CUDA device if there is one, else the CPU. `dtype` None/"auto": bf16 (fp16 on GPUs
    without bf16) on a GPU, fp32 on the CPU; strings "bf16", "fp16", "fp32" are accepted."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype is None or dtype == "auto":
        return device, _default_dtype(device)
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"Unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32.")
        dtype = names[dtype]
    return device, dtype


def quantization_config(quantization: str | None, dtype: torch.dtype):
    """bitsandbytes settings for "8bit" / "4bit" (the LLM only: the vision tower and abstractor stay in `dtype`)."""
    if quantization is None:
        return None
    if quantization not in ("8bit", "4bit"):
        raise ValueError(f"quantization must be None, '8bit' or '4bit', not {quantization!r}.")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        raise CheckpointError(f"{quantization} loading needs a CUDA GPU and `pip install bitsandbytes`.")
    from transformers import BitsAndBytesConfig

    keep = ["vision_model", "visual_abstractor", "lm_head"]
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, llm_int8_skip_modules=keep)


def _load_full_model(location: str, dtype: torch.dtype, config: MplugOwl2Config | None = None, quantization=None):
    extra = {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}} if quantization else {}
    try:
        model, info = MPLUGOwl2LlamaForCausalLM.from_pretrained(
            location, dtype=dtype, config=config, output_loading_info=True, **extra
        )
    except CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"Could not load an mPLUG-Owl2 checkpoint from {location}: {error}. A checkpoint folder holds "
            "config.json (model_type mplug_owl2) and model*.safetensors or pytorch_model*.bin; if a file is corrupt, "
            f"delete it and download it again. {_download_hint(location, 'the checkpoint') if not os.path.isdir(location) else ''}"
        ) from error
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise CheckpointError(
            f"{location} lacks {len(missing)} weights of mPLUG-Owl2 (e.g. {missing[:3]}). It is not a complete "
            "mPLUG-Owl2 checkpoint: for a LoRA release, pass it as the model and its base model as `base`."
        )
    return model


def _non_lora_state_dict(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference's key rules: drop `base_model.`, then a leading `model.` where keys start `model.model.`."""
    state = {(k[len("base_model.") :] if k.startswith("base_model.") else k): v for k, v in raw.items()}
    if any(k.startswith("model.model.") for k in state):
        state = {(k[len("model.") :] if k.startswith("model.") else k): v for k, v in state.items()}
    return state


def _lora_base(lora: str, adapter_config: Path, base: str | None, default_base: str | None) -> str:
    if base is not None:
        return base
    recorded = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    if recorded and os.path.isdir(lora) and os.path.isdir(os.path.join(lora, recorded)):
        return os.path.normpath(os.path.join(lora, recorded))
    if recorded and os.path.isdir(recorded):
        return recorded
    if default_base is not None:
        return default_base
    if recorded:
        return recorded
    raise CheckpointError(f"{lora} is a LoRA release but names no base model: pass `base=`.")


def _apply_lora(model, lora: str, merge: bool):
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, lora)
    except Exception as error:
        raise CheckpointError(f"Could not load the LoRA adapter of {lora}: {error}") from error
    return model.merge_and_unload() if merge else model


def save_processing_files(checkpoint: LoadedCheckpoint, out: str | os.PathLike) -> None:
    """The tokenizer and the preprocessor settings, so that a folder loads without its base."""
    shutil.copyfile(checkpoint.tokenizer.model_file, Path(out) / "tokenizer.model")
    (Path(out) / "preprocessor_config.json").write_text(json.dumps(checkpoint.image_config.to_dict(), indent=2))


def save_checkpoint(checkpoint: LoadedCheckpoint, out: str | os.PathLike) -> None:
    """A full checkpoint folder (config, safetensors weights, tokenizer, preprocessor) that loads without peft."""
    Path(out).mkdir(parents=True, exist_ok=True)
    checkpoint.model.save_pretrained(out)
    save_processing_files(checkpoint, out)


def load_checkpoint(
    model: str | os.PathLike,
    base: str | os.PathLike | None = None,
    default_base: str | None = None,
    dtype: torch.dtype = torch.float32,
    merge_lora: bool = True,
    quantization: str | None = None,
) -> LoadedCheckpoint:
    """Loads a full checkpoint, or an ArtQuant LoRA release on top of `base` (else the release's recorded base,
    else `default_base`). Tokenizer and preprocessing come from the checkpoint, else from its base.
    `quantization` "8bit"/"4bit" loads the LLM through bitsandbytes (CUDA only; LoRA is then applied unmerged)."""
    model, base = str(model), (str(base) if base is not None else None)
    quantization = quantization_config(quantization, dtype)
    adapter_config = find_file(model, ADAPTER_CONFIG, required=False)
    if adapter_config is None:
        if base is not None:
            raise CheckpointError(f"{model} is a full checkpoint (it has no {ADAPTER_CONFIG}); do not pass a base.")
        network = _load_full_model(model, dtype, quantization=quantization)
        sources = [model]
    else:
        base = _lora_base(model, adapter_config, base, default_base)
        release_config = find_file(model, "config.json", required=False)
        config = MplugOwl2Config.from_pretrained(str(release_config.parent)) if release_config else None
        network = _load_full_model(base, dtype, config, quantization)
        non_lora = next((f for f in (find_file(model, name, required=False) for name in NON_LORA_WEIGHTS) if f), None)
        if non_lora is not None:
            state = _non_lora_state_dict(load_weights_file(non_lora))
            result = network.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
            if result.unexpected_keys:
                raise CheckpointError(
                    f"{non_lora} has weights this model does not have (e.g. {result.unexpected_keys[:3]}): "
                    "the release and the base model do not match."
                )
        lora = str(adapter_config.parent) if os.path.isdir(model) else model
        network = _apply_lora(network, lora, merge_lora and quantization is None)
        sources = [model, base]
    network.eval()

    tokenizer_file = next((f for f in (find_file(s, "tokenizer.model", required=False) for s in sources) if f), None)
    if tokenizer_file is None:
        raise CheckpointError(f"No tokenizer.model in {' or '.join(sources)}: copy LLaMA-2's tokenizer.model there.")
    processor_file = next(
        (f for f in (find_file(s, "preprocessor_config.json", required=False) for s in sources) if f), None
    )
    image_config = (
        ImageProcessingConfig.from_dict(json.loads(processor_file.read_text()))
        if processor_file
        else ImageProcessingConfig(resize_to=network.config.vision_config.image_size,
                                   crop_size=network.config.vision_config.image_size)
    )
    return LoadedCheckpoint(network, PromptTokenizer(tokenizer_file), image_config, " + ".join(sources))
