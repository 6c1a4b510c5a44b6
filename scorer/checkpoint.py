"""Finding and loading mPLUG-Owl2 checkpoints: full ones, ArtQuant LoRA releases, and `artquant convert` output.

A local folder and a Hugging Face id take the same path (`from_pretrained`, `hf_hub_download`), which downloads
only the files needed. Pickled files are only ever read with `torch.load(weights_only=True)`: here, and by
transformers (`weights_only=True` passed) and peft (its `torch_load` defaults to it). Every broken part is a
`CheckpointError` that names the file and says what to do.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
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
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
LORA_CONFIG_KEYS = ("peft_type", "r", "lora_alpha", "target_modules")  # peft would silently default the rest
# A full checkpoint's weights: one file or an index of shards, safetensors preferred (transformers' order).
WEIGHTS_FILES = (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json"))
# Buffers that older transformers saved with LLaMA weights and that are recomputed now: not a config mismatch.
STALE_BUFFERS = ("rotary_emb.inv_freq",)


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


def _reason(error: Exception) -> str:
    """An exception's first sentence on one line (libraries append long advice), else its type's name."""
    return " ".join(str(error).split()).split(". ")[0].rstrip(".") or type(error).__name__


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors or pickled state dict, the latter through `torch.load(weights_only=True)` only."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's own text advises retrying with weights_only=False, which would run the file's code: not passed on.
        refused = next((line.strip() for line in str(error).splitlines() if "Unsupported global" in line), None)
        if refused is not None:
            raise CheckpointError(
                f"Refusing to read {path}: it holds Python objects other than tensors, which artquant never unpickles "
                f"(they can run code; {refused}). Use a checkpoint from a source you trust, in safetensors "
                "(`artquant convert` writes one from a trusted folder)."
            ) from None
        raise CheckpointError(
            f"Could not read {path}: its pickle is damaged. The file is corrupt or incomplete: delete it and download "
            "it again."
        ) from None
    except Exception as error:
        raise CheckpointError(
            f"Could not read {path}: {_reason(error)}. The file is corrupt or incomplete (or not a plain tensor file): "
            "delete it and download it again."
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict (a mapping of names to tensors): download it again.")
    return state


def _weights_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes in a weights file; reads only the header of a safetensors file."""
    if path.suffix != ".safetensors":
        return {k: tuple(v.shape) for k, v in load_weights_file(path).items()}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as weights:
            return {k: tuple(weights.get_slice(k).get_shape()) for k in weights.keys()}
    except Exception as error:
        raise CheckpointError(
            f"Could not read {path}: {_reason(error)}. The file is corrupt or incomplete: delete it and download it again."
        ) from error


# Dtype names users type: ours and torch's. None ("auto") lets the device choose.
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype that `dtype` names: one of `DTYPES` (also spelt "torch.float16"), or torch.float32 /
    float16 / bfloat16 themselves; None for None or "auto". Anything else: a ValueError listing what is accepted."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    name = dtype.strip().lower().removeprefix("torch.") if isinstance(dtype, str) else dtype
    if name is None or name == "auto":
        return None
    if name in DTYPES:
        return DTYPES[name]
    raise ValueError(f"Unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)} (or torch.float32, torch.float16, "
                     "torch.bfloat16).")


def _default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_device_and_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """`device` None: the first CUDA device if there is one, else the CPU. `dtype` (see `parse_dtype`) None/"auto":
    bf16 (fp16 on GPUs without bf16) on a GPU, fp32 on the CPU."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = parse_dtype(dtype)
    return device, dtype if dtype is not None else _default_dtype(device)


MPLUG_OWL2_UNQUANTIZED = ("vision_model", "visual_abstractor", "lm_head")


def quantization_config(quantization: str | None, dtype: torch.dtype, keep: tuple[str, ...] = MPLUG_OWL2_UNQUANTIZED):
    """bitsandbytes settings for "8bit" / "4bit" (the LLM only: the modules named in `keep`, by default mPLUG-Owl2's
    vision tower, abstractor and output layer, stay in `dtype`)."""
    if quantization is None:
        return None
    if quantization not in ("8bit", "4bit"):
        raise ValueError(f"quantization must be None, '8bit' or '4bit', not {quantization!r}.")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        raise CheckpointError(f"{quantization} loading needs a CUDA GPU and `pip install bitsandbytes`.")
    from transformers import BitsAndBytesConfig

    keep = list(keep)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, llm_int8_skip_modules=keep)


def _read_json(path: Path, remedy: str) -> dict:
    """The JSON object in `path`; anything else is a CheckpointError that names the file and ends with `remedy`."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read ({error.strerror or error}): check its permissions.") from None
    try:
        values = json.loads(data)
    except ValueError as error:  # also JSONDecodeError and UnicodeDecodeError
        raise CheckpointError(f"{path} is not valid JSON ({error}): {remedy}") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} holds a JSON {type(values).__name__}, not an object: {remedy}")
    return values


def _read_model_config(path: Path) -> MplugOwl2Config:
    remedy = "download the checkpoint's config.json again."
    values = _read_json(path, remedy)
    if values.get("model_type") != MplugOwl2Config.model_type:
        raise CheckpointError(
            f"{path} describes a model of type {values.get('model_type')!r}, not mplug_owl2: pass an mPLUG-Owl2 "
            "checkpoint (such as MAGAer13/mplug-owl2-llama2-7b) or an ArtQuant release; for a Q-ReAlign (Qwen-VL) "
            "checkpoint choose a qrealign-* preset."
        )
    try:
        return MplugOwl2Config.from_dict(values)
    except Exception as error:
        raise CheckpointError(f"{path} is not a valid mPLUG-Owl2 config ({_reason(error)}): {remedy}") from None


def _weights_files(location: str) -> list[Path]:
    """The files a full checkpoint's weights are in, in the order transformers prefers them (it reads one set)."""
    for single, index in WEIGHTS_FILES:
        file = find_file(location, single, required=False)
        if file is not None:
            return [file]
        index_file = find_file(location, index, required=False)
        if index_file is not None:
            weight_map = _read_json(index_file, "download it again.").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index_file} has no weight_map of weight names to file names: download it again.")
            return [find_file(location, shard) for shard in sorted(set(weight_map.values()))]
    return []


def _explain_load_failure(location: str, config: MplugOwl2Config, config_file: Path, error: Exception) -> CheckpointError:
    """Why transformers could not load `location`, naming the file at fault: one that is missing, unreadable or
    corrupt, or whose tensors do not have the shapes that `config_file` gives them. Runs only after a failure."""
    files = _weights_files(location)  # raises for a missing shard or an unreadable index
    if not files:
        return CheckpointError(
            f"{location} has no weights: a checkpoint folder holds config.json (model_type mplug_owl2) and "
            "model*.safetensors or pytorch_model*.bin. Download the whole checkpoint."
        )
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MPLUGOwl2LlamaForCausalLM(config).state_dict().items()}
    for file in files:
        shapes = _weights_shapes(file)  # raises, naming the file, when it cannot be read
        wrong = [(k, shape) for k, shape in shapes.items() if k in expected and expected[k] != shape]
        if wrong:
            name, shape = wrong[0]
            return CheckpointError(
                f"The weights in {file} do not match {config_file}: {name} is {list(shape)} there but "
                f"{list(expected[name])} by the config ({len(wrong)} weights differ). The config and the weights "
                "come from different models: download the checkpoint's config.json again."
            )
    return CheckpointError(
        f"Could not load an mPLUG-Owl2 checkpoint from {location}: {_reason(error)}. If a file is corrupt, delete it and "
        f"download it again. {'' if os.path.isdir(location) else _download_hint(location, 'the checkpoint')}"
    )


def _load_full_model(location: str, dtype: torch.dtype, config: MplugOwl2Config, config_file: Path, quantization=None,
                     device: torch.device | None = None):
    if quantization:
        extra = {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}
    else:
        # Built on the meta device, then each weight goes from the memory-mapped files to `device` in `dtype`:
        # no float32 model first, no whole copy in RAM on the way to a GPU.
        extra = {"device_map": {"": _indexed(device or torch.device("cpu"))}}
    try:
        model, info = MPLUGOwl2LlamaForCausalLM.from_pretrained(
            location, dtype=dtype, config=config, output_loading_info=True, weights_only=True, **extra
        )
    except CheckpointError:
        raise
    except Exception as error:
        raise _explain_load_failure(location, config, config_file, error) from error
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise CheckpointError(
            f"{', '.join(map(str, _weights_files(location)))} lacks {len(missing)} weights of mPLUG-Owl2 (e.g. "
            f"{missing[:3]}). It is not a complete mPLUG-Owl2 checkpoint: download it again, or, for a LoRA release, "
            "pass the release as the model and its base model as `base`."
        )
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.endswith(STALE_BUFFERS))
    if unexpected:
        raise CheckpointError(
            f"{location} has {len(unexpected)} weights that {config_file} does not describe (e.g. {unexpected[:3]}): "
            "the config and the weights come from different models: download the checkpoint's config.json again."
        )
    return model


def _indexed(device: torch.device) -> torch.device:
    """`cuda` -> `cuda:<current>`: a device map names one device."""
    device = torch.device(device)
    return torch.device(device.type, torch.cuda.current_device()) if device.type == "cuda" and device.index is None else device


def _non_lora_state_dict(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference's key rules: drop `base_model.`, then a leading `model.` where keys start `model.model.`."""
    state = {(k[len("base_model.") :] if k.startswith("base_model.") else k): v for k, v in raw.items()}
    if any(k.startswith("model.model.") for k in state):
        state = {(k[len("model.") :] if k.startswith("model.") else k): v for k, v in state.items()}
    return state


def _load_non_lora_weights(network, path: Path, base: str, dtype: torch.dtype) -> None:
    """The release's fully trained vision tower and abstractor, checked against the base's shapes first."""
    state = _non_lora_state_dict(load_weights_file(path))
    expected = network.state_dict()
    unknown = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and tuple(expected[k].shape) != tuple(state[k].shape)]
    if unknown or wrong:
        detail = (f"it has weights the model lacks (e.g. {unknown[:3]})" if unknown else
                  f"{wrong[0]} is {list(state[wrong[0]].shape)} there but {list(expected[wrong[0]].shape)} in the model")
        raise CheckpointError(
            f"{path} does not fit the base model {base}: {detail}. The release and the base do not match: pass the "
            "base it was trained on with `base=` (--base)."
        )
    network.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)


def _read_adapter_config(path: Path):
    """The release's peft LoRA config, validated by peft; a CheckpointError naming the file otherwise."""
    from peft import LoraConfig

    remedy = "download the release's adapter_config.json again."
    values = _read_json(path, remedy)
    missing = [key for key in LORA_CONFIG_KEYS if key not in values]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}, so it is not a LoRA adapter config: {remedy}")
    if values["peft_type"] != "LORA":
        raise CheckpointError(f"{path} describes a {values['peft_type']!r} adapter; ArtQuant releases are LoRA "
                              f"adapters (peft_type LORA): {remedy}")
    rank, targets = values["r"], values["target_modules"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise CheckpointError(f"{path} is not a valid LoRA config (r {rank!r} is not a positive whole number): {remedy}")
    if not targets or not (isinstance(targets, str) or all(isinstance(t, str) for t in targets)):
        raise CheckpointError(f"{path} is not a valid LoRA config (target_modules {targets!r} names no modules): {remedy}")
    try:
        return LoraConfig.from_pretrained(str(path.parent))
    except Exception as error:
        raise CheckpointError(f"{path} is not a valid LoRA config ({_reason(error)}): {remedy}") from None


def _lora_base(lora: str, recorded: str | None, base: str | None, default_base: str | None) -> str:
    if base is not None:
        return base
    if recorded and os.path.isdir(lora) and os.path.isdir(os.path.join(lora, recorded)):
        return os.path.normpath(os.path.join(lora, recorded))
    if recorded and os.path.isdir(recorded):
        return recorded
    if default_base is not None:
        return default_base
    if recorded:
        return recorded
    raise CheckpointError(f"{lora} is a LoRA release but names no base model: pass `base=`.")


def _apply_lora(model, lora: str, peft_config, adapter_config: Path, adapter_weights: Path, base: str, merge: bool):
    from peft import PeftModel

    try:
        with warnings.catch_warnings():
            # peft reads transformers 5's deprecated `is_gradient_checkpointing`; the warning is theirs, not the user's.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            model = PeftModel.from_pretrained(model, lora, config=peft_config)
    except Exception as error:
        load_weights_file(adapter_weights)  # a corrupt file is named as such
        raise CheckpointError(
            f"Could not apply the LoRA adapter {adapter_weights} to the base model {base}: {_reason(error)}. Check that "
            f"{adapter_config}'s target_modules and r fit the base, or pass the base the release was trained on "
            "with `base=` (--base)."
        ) from error
    return model.merge_and_unload() if merge else model


def _load_tokenizer(path: Path | None, sources: list[str], config: MplugOwl2Config) -> PromptTokenizer:
    if path is None:
        raise CheckpointError(f"No tokenizer.model in {' or '.join(sources)}: copy LLaMA-2's tokenizer.model there.")
    try:
        tokenizer = PromptTokenizer(path)
    except Exception as error:  # sentencepiece raises RuntimeError/OSError for files it cannot parse
        raise CheckpointError(
            f"{path} is not a SentencePiece tokenizer model ({_reason(error)}): replace it with LLaMA-2's tokenizer.model."
        ) from None
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(
            f"{path} has {len(tokenizer)} tokens but the model only {config.vocab_size}: it is another model's "
            "tokenizer. Replace it with LLaMA-2's tokenizer.model."
        )
    return tokenizer


def _image_config(path: Path | None, config: MplugOwl2Config) -> ImageProcessingConfig:
    """The preprocessing `path` (a CLIPImageProcessor config) describes, else the vision model's defaults."""
    image_size = config.vision_config.image_size
    if path is None:
        return ImageProcessingConfig(resize_to=image_size, crop_size=image_size)
    remedy = f"fix it, or delete it to use this model's defaults ({image_size} px, bicubic, CLIP mean and std)."
    try:
        image_config = ImageProcessingConfig.from_dict(_read_json(path, remedy))
    except ValueError as error:
        raise CheckpointError(f"{path} cannot be used: {error} Please {remedy}") from None
    if image_config.crop_size != image_size:
        raise CheckpointError(
            f"{path} crops images to {image_config.crop_size} px, but the vision model takes {image_size} px: {remedy}"
        )
    return image_config


def _first_file(locations: list[str], *filenames: str) -> Path | None:
    """The first of `filenames` (in order of preference) that one of `locations` (in order) has."""
    found = (find_file(location, name, required=False) for name in filenames for location in locations)
    return next((file for file in found if file is not None), None)


def save_processing_files(checkpoint: LoadedCheckpoint, out: str | os.PathLike) -> None:
    """The tokenizer and the preprocessor settings, so that a folder loads without its base."""
    shutil.copyfile(checkpoint.tokenizer.model_file, Path(out) / "tokenizer.model")
    (Path(out) / "preprocessor_config.json").write_text(json.dumps(checkpoint.image_config.to_dict(), indent=2))


def save_checkpoint(checkpoint: LoadedCheckpoint, out: str | os.PathLike) -> None:
    """A full checkpoint folder (config, safetensors weights, tokenizer, preprocessor) that loads without peft."""
    Path(out).mkdir(parents=True, exist_ok=True)
    checkpoint.model.save_pretrained(out)
    save_processing_files(checkpoint, out)


def _checkpoint_sources(model: str, base: str | None, default_base: str | None) -> tuple[list[str], Path | None, object, Path | None]:
    """(the locations files are read from: [model] or [LoRA release, its base], the release's adapter config file,
    its peft config, its adapter weights); the last three are None for a full checkpoint."""
    adapter_config = find_file(model, ADAPTER_CONFIG, required=False)
    if adapter_config is None:
        if base is not None:
            raise CheckpointError(f"{model} is a full checkpoint (it has no {ADAPTER_CONFIG}); do not pass a base.")
        return [model], None, None, None
    peft_config = _read_adapter_config(adapter_config)
    base = _lora_base(model, peft_config.base_model_name_or_path, base, default_base)
    adapter_weights = _first_file([model], *ADAPTER_WEIGHTS)
    if adapter_weights is None:
        raise CheckpointError(f"{model} has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}: download the "
                              "whole release.")
    return [model, base], adapter_config, peft_config, adapter_weights


def _model_config(sources: list[str]) -> tuple[Path, MplugOwl2Config]:
    config_file = _first_file(sources, "config.json") or find_file(sources[-1], "config.json")
    return config_file, _read_model_config(config_file)


def load_image_config(
    model: str | os.PathLike, base: str | os.PathLike | None = None, default_base: str | None = None
) -> ImageProcessingConfig:
    """The preprocessing `load_checkpoint(model, base, default_base)` would use, read from the checkpoint's small
    files only (config.json, preprocessor_config.json; no weights, no tokenizer): for workers that preprocess images
    apart from the model. Broken files raise the same `CheckpointError` as `load_checkpoint`."""
    sources, *_ = _checkpoint_sources(str(model), str(base) if base is not None else None, default_base)
    _, config = _model_config(sources)
    return _image_config(_first_file(sources, "preprocessor_config.json"), config)


def load_checkpoint(
    model: str | os.PathLike,
    base: str | os.PathLike | None = None,
    default_base: str | None = None,
    dtype: torch.dtype = torch.float32,
    merge_lora: bool = True,
    quantization: str | None = None,
    device: torch.device | str | None = None,
) -> LoadedCheckpoint:
    """Loads a full checkpoint, or an ArtQuant LoRA release on top of `base` (else the release's recorded base,
    else `default_base`). Tokenizer and preprocessing come from the checkpoint, else from its base.
    `quantization` "8bit"/"4bit" loads the LLM through bitsandbytes (CUDA only; LoRA is then applied unmerged).
    The weights load straight onto `device` (default: the CPU) in `dtype`, where a LoRA release is also merged;
    peft is imported only for a LoRA release.

    The small files (configs, tokenizer, preprocessor) are checked before any weights are read, and every broken
    part is a `CheckpointError` that names the file and says what to do."""
    model, base = str(model), (str(base) if base is not None else None)
    quantization = quantization_config(quantization, dtype)
    sources, adapter_config, peft_config, adapter_weights = _checkpoint_sources(model, base, default_base)
    base = sources[-1] if adapter_config is not None else base
    config_file, config = _model_config(sources)
    tokenizer = _load_tokenizer(_first_file(sources, "tokenizer.model"), sources, config)
    image_config = _image_config(_first_file(sources, "preprocessor_config.json"), config)

    network = _load_full_model(sources[-1], dtype, config, config_file, quantization, device)
    if adapter_config is not None:
        non_lora = _first_file([model], *NON_LORA_WEIGHTS)
        if non_lora is not None:
            _load_non_lora_weights(network, non_lora, base, dtype)
        lora = str(adapter_config.parent) if os.path.isdir(model) else model
        network = _apply_lora(network, lora, peft_config, adapter_config, adapter_weights, base,
                              merge_lora and quantization is None)
    network.eval()
    return LoadedCheckpoint(network, tokenizer, image_config, " + ".join(sources))
