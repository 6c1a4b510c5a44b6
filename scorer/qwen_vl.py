"""Level-word scoring on transformers' own Qwen-VL models (Q-ReAlign on Qwen3.5-VL), beside the native mPLUG-Owl2.

The model, tokenizer and chat template are the checkpoint's, loaded by transformers' Auto classes (no remote code).
Two things are this module's own, for speed and batching:

* Preprocessing in torch: transformers' Qwen2-VL image processor (its torchvision backend, which the authors' code
  runs) resizes each image to a multiple of patch x merge pixels within a pixel budget (`smart_resize`), with
  antialiased bicubic interpolation, normalises it and cuts it into flat patches. uint8 images give the processor's
  numbers exactly; float images the same steps differentiably, so `score_tensor` works as a reward.
* Batching: Qwen's dynamic resolution gives every image its own number of tokens. Each row is the prompt with its
  image's tokens, padded on the right; causal attention and the recurrent (gated delta) layers read left to right, so
  padding after a row's last token cannot reach it, and that token's logits are read where each row ends.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, LoadedCheckpoint, _indexed, _read_json, _reason, find_file, quantization_config
from .preprocessing import _is_number, _three_numbers
from .presets import Preset
from .scoring import ArtQuantScorer

IMAGE_PROCESSORS = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLImageProcessorPil")
MAX_ASPECT_RATIO = 200  # smart_resize refuses longer sides than this many times the shorter one
QWEN_VL_UNQUANTIZED = ("visual", "lm_head")  # quantised loading keeps the vision tower and output layer in dtype
PROBE_PIXELS = 1024 * 1024  # `largest_batch_size` probes with images this large (or the budget, if smaller)


@dataclass
class QwenPixels:
    """A batch of images as Qwen-VL takes them: every image's flat patches one after another, and each image's
    (temporal, height, width) patch grid."""

    patches: torch.Tensor  # [total patches, channels * temporal_patch * patch * patch]
    grid_thw: torch.Tensor  # [images, 3], int64

    def __len__(self) -> int:
        return self.grid_thw.shape[0]

    def __getitem__(self, images: slice) -> QwenPixels:
        """The images in `images` (a slice), with exactly their patches."""
        start, stop, step = images.indices(len(self))
        if step != 1:
            raise ValueError("QwenPixels takes contiguous slices of images only.")
        offsets = [0, *self.grid_thw.prod(-1).cumsum(0).tolist()]
        return QwenPixels(self.patches[offsets[start] : offsets[stop]], self.grid_thw[start:stop])

    def to(self, device, dtype: torch.dtype | None = None) -> QwenPixels:
        return QwenPixels(self.patches.to(device, dtype), self.grid_thw.to(device))


@dataclass(frozen=True)
class QwenImageConfig:
    """What a Qwen2-VL image processor's `preprocessor_config.json` says; defaults are Qwen3.5-VL's."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 256 * 256
    max_pixels: int = 4096 * 4096
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dict(cls, values: dict) -> QwenImageConfig:
        """Reads a Qwen2-VL image processor config; a ValueError names the value that is impossible or unsupported."""
        kind = values.get("image_processor_type", IMAGE_PROCESSORS[0])
        if kind not in IMAGE_PROCESSORS:
            raise ValueError(f"image_processor_type {kind!r} is not a Qwen2-VL image processor ({', '.join(IMAGE_PROCESSORS)}).")
        if values.get("resample", 3) != 3:
            raise ValueError(f"resample {values['resample']!r} is not supported: only 3 (bicubic), as Qwen-VL uses.")
        for step in ("do_resize", "do_rescale", "do_normalize"):
            if values.get(step, True) is not True:
                raise ValueError(f"{step} is {values[step]!r}, but Qwen-VL's preprocessing always does this step.")
        size = values.get("size") or {}
        numbers = {
            "patch_size": values.get("patch_size", cls.patch_size),
            "temporal_patch_size": values.get("temporal_patch_size", cls.temporal_patch_size),
            "merge_size": values.get("merge_size", cls.merge_size),
            "min_pixels": values.get("min_pixels", size.get("shortest_edge", cls.min_pixels)),
            "max_pixels": values.get("max_pixels", size.get("longest_edge", cls.max_pixels)),
        }
        for name, value in numbers.items():
            if not _is_number(value) or value != int(value) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, not {value!r}.")
        numbers = {name: int(value) for name, value in numbers.items()}
        if numbers["min_pixels"] > numbers["max_pixels"]:
            raise ValueError(f"the pixel budget is empty: min_pixels {numbers['min_pixels']} > max_pixels {numbers['max_pixels']}.")
        image_mean = _three_numbers("image_mean", values.get("image_mean", cls.image_mean))
        image_std = _three_numbers("image_std", values.get("image_std", cls.image_std))
        rescale_factor = values.get("rescale_factor", cls.rescale_factor)
        if min(image_std) <= 0 or not _is_number(rescale_factor) or not rescale_factor > 0:
            raise ValueError(f"image_std {list(image_std)} and rescale_factor {rescale_factor!r} must be positive.")
        return cls(**numbers, image_mean=image_mean, image_std=image_std, rescale_factor=float(rescale_factor))

    def to_dict(self) -> dict:
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "do_resize": True, "resample": 3, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size, "rescale_factor": self.rescale_factor,
            "image_mean": list(self.image_mean), "image_std": list(self.image_std),
        }

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """transformers' `smart_resize`: sides rounded to multiples of patch x merge, the area kept within
        [min_pixels, max_pixels], the aspect ratio as close as that allows."""
        if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
            raise ValueError(f"the image is {width} x {height}, more than {MAX_ASPECT_RATIO} times longer than wide, "
                             "which Qwen-VL models do not take: crop it.")
        factor = self.patch_size * self.merge_size
        new_height, new_width = round(height / factor) * factor, round(width / factor) * factor
        if new_height * new_width > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            new_height = max(factor, math.floor(height / beta / factor) * factor)
            new_width = max(factor, math.floor(width / beta / factor) * factor)
        elif new_height * new_width < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            new_height, new_width = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
        return new_height, new_width

    def pixel_values(self, images: torch.Tensor) -> QwenPixels:
        """RGB images [B, 3, H, W] -> their patches. uint8 in [0, 255]: the processor's numbers exactly (float32).
        Float in [0, 1]: differentiable, equal to the uint8 path up to its 8-bit rounding; keeps the input's dtype."""
        batch, _, height, width = images.shape
        size = self.resized_size(height, width)
        quantized = images.dtype == torch.uint8
        resized = images
        if size != (height, width):
            if quantized and images.device.type == "cpu":  # torchvision resizes uint8 natively on the CPU
                resized = F.interpolate(images.contiguous(), size, mode="bicubic", antialias=True, align_corners=False)
            else:  # elsewhere (and for floats) in float, then clamped (and rounded) as torchvision does
                resized = F.interpolate(images.float() if quantized else images, size, mode="bicubic", antialias=True,
                                        align_corners=False)
                resized = resized.clamp(0, 255).round() if quantized else resized.clamp(0, 1)
        # The processor folds the rescale into mean and std (in float32): the same arithmetic keeps it bit-exact.
        scale = 1.0 / self.rescale_factor if quantized else 1.0
        dtype = torch.float32 if quantized else images.dtype
        mean = (torch.tensor(self.image_mean, device=images.device) * scale).to(dtype).view(1, 3, 1, 1)
        std = (torch.tensor(self.image_std, device=images.device) * scale).to(dtype).view(1, 3, 1, 1)
        normalized = (resized.to(dtype) - mean) / std
        return QwenPixels(self._patchify(normalized), torch.tensor([[1, size[0] // self.patch_size,
                                                                     size[1] // self.patch_size]] * batch))

    def _patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B * patches, C * temporal * patch * patch] in the processor's order: merge windows row by
        row, the patches of a window together, each patch repeated over the temporal axis (an image is one frame)."""
        batch, channels, height, width = images.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        grid_h, grid_w = height // p, width // p
        windows = images.reshape(batch, channels, grid_h // m, m, p, grid_w // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        frames = windows.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)
        return frames.reshape(batch * grid_h * grid_w, channels * t * p * p)

    def collate(self, parts: list[QwenPixels]) -> QwenPixels:
        return QwenPixels(torch.cat([part.patches for part in parts]), torch.cat([part.grid_thw for part in parts]))

    def probe_pixel_values(self, batch: int, device, dtype) -> QwenPixels:
        """`batch` large blank images (the budget's largest square, at most PROBE_PIXELS), to size batches with."""
        factor = self.patch_size * self.merge_size
        side = max(factor, math.isqrt(min(self.max_pixels, PROBE_PIXELS)) // factor * factor)
        return self.pixel_values(torch.zeros(batch, 3, side, side, dtype=dtype, device=device))

    def tokens_per_image(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """[images, 3] grids -> [images] numbers of image tokens in the text (patches merged merge x merge)."""
        return grid_thw.prod(-1) // self.merge_size**2


def _check_family(config_file: Path) -> None:
    """A CheckpointError unless `config_file` describes a Qwen-VL model (a vision config and an image token)."""
    values = _read_json(config_file, "download the checkpoint's config.json again.")
    if "image_token_id" not in values or "vision_config" not in values:
        raise CheckpointError(
            f"{config_file} describes a model of type {values.get('model_type')!r}, not a Qwen-VL model: pass a "
            "Q-ReAlign checkpoint (such as q-future/Q-ReAlign-Mini-0.8B), or choose a preset of its family.")


def load_qwen_image_config(model: str | os.PathLike) -> QwenImageConfig:
    """The preprocessing of the Qwen-VL checkpoint `model` (a folder or Hugging Face id), from its small files alone:
    preprocessor_config.json, or the "image_processor" entry of processor_config.json (where transformers 5 saves a
    processor). For workers that preprocess images apart from the model."""
    _check_family(find_file(str(model), "config.json"))
    remedy = "download the checkpoint's preprocessor_config.json or processor_config.json again."
    path = find_file(str(model), "preprocessor_config.json", required=False)
    if path is not None:
        values = _read_json(path, remedy)
    else:
        path = find_file(str(model), "processor_config.json", required=False)
        if path is None:
            raise CheckpointError(f"{model} has neither preprocessor_config.json nor processor_config.json: download "
                                  "the whole checkpoint again; a Qwen-VL model's image size and patch grid are read "
                                  "from them.")
        values = _read_json(path, remedy).get("image_processor")
        if not isinstance(values, dict):
            raise CheckpointError(f"{path} has no \"image_processor\" settings: {remedy}")
    try:
        return QwenImageConfig.from_dict(values)
    except ValueError as error:
        raise CheckpointError(f"{path} cannot be used: {error} Please {remedy}") from None


def load_qwen_checkpoint(model: str | os.PathLike, dtype: torch.dtype, device: torch.device,
                         quantization: str | None = None) -> LoadedCheckpoint:
    """A Qwen-VL checkpoint through transformers' Auto classes: model, tokenizer (with its chat template) and
    preprocessing. Every broken part is a CheckpointError that says what to do."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    location = str(model)
    config_file = find_file(location, "config.json")
    image_config = load_qwen_image_config(location)
    try:
        config = AutoConfig.from_pretrained(location)
    except Exception as error:
        raise CheckpointError(f"{config_file} is not a config this transformers knows ({_reason(error)}): "
                              "upgrade transformers (Qwen3.5-VL needs >= 5.2).") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except Exception as error:
        raise CheckpointError(f"The tokenizer of {location} cannot be loaded ({_reason(error)}): download its "
                              "tokenizer.json and tokenizer_config.json again.") from None
    if not tokenizer.chat_template:  # older processors keep it in chat_template.json
        legacy = find_file(location, "chat_template.json", required=False)
        template = _read_json(legacy, "download it again.").get("chat_template") if legacy is not None else None
        if not isinstance(template, str) or not template:
            raise CheckpointError(f"{location} has no chat template (chat_template.jinja): download it again; the "
                                  "scoring prompt is built with it.")
        tokenizer.chat_template = template
    if tokenizer.convert_tokens_to_ids("<|image_pad|>") != config.image_token_id:
        raise CheckpointError(f"The tokenizer of {location} does not match its model (<|image_pad|> is not token "
                              f"{config.image_token_id}): download the tokenizer files again.")
    extra: dict[str, Any] = {"device_map": {"": _indexed(device)}}
    if quantization is not None:
        extra = {"quantization_config": quantization_config(quantization, dtype, keep=QWEN_VL_UNQUANTIZED),
                 "device_map": {"": torch.cuda.current_device()}}
    try:
        network, info = AutoModelForImageTextToText.from_pretrained(
            location, config=config, dtype=dtype, output_loading_info=True, **extra)
    except Exception as error:
        raise CheckpointError(f"The weights of {location} cannot be loaded ({_reason(error)}): download the "
                              "checkpoint again.") from error
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise CheckpointError(f"{location} lacks {len(missing)} weights of its model (e.g. {missing[:3]}): download "
                              "the checkpoint again.")
    return LoadedCheckpoint(network.eval(), tokenizer, image_config, location)


def _refuse_base(base, preset: Preset) -> None:
    if base is not None:
        raise ValueError(f"The {preset.name} preset loads full Qwen-VL checkpoints; `base` is not used: leave it out.")


class QwenVLScorer(ArtQuantScorer):
    """A level-word scorer on a Qwen-VL model (Q-ReAlign): same interface as `ArtQuantScorer`, which returns one for
    presets of family "qwen_vl".

    >>> scorer = ArtQuantScorer.from_pretrained(preset="qrealign-mini-quality")
    >>> [r.score for r in scorer.score(["a.png", "b.jpg"])]    # 0 (bad) .. 1 (excellent)
    """

    def __init__(self, checkpoint: LoadedCheckpoint, preset: Preset, device: torch.device, dtype: torch.dtype):
        self.model = checkpoint.model
        self.tokenizer = checkpoint.tokenizer
        self.image_config: QwenImageConfig = checkpoint.image_config
        self.preset = preset
        self.device = device
        self.dtype = dtype
        self.source = checkpoint.source
        self.image_token_id = self.model.config.image_token_id
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.prompt_parts = self._prompt_parts(preset.question, preset.answer_prefix)
        self.prompt_ids = torch.tensor([*self.prompt_parts[0], self.image_token_id, *self.prompt_parts[1]], device=device)
        self.level_ids = torch.tensor([self._first_token(word) for word in preset.level_names], device=device)
        self.prefix_caching = False  # a few tokens before the image: nothing worth caching
        self._largest_batch_size: int | None = None

    @classmethod
    def _load(cls, model, base, preset: Preset, dtype, device, merge_lora, quantization) -> LoadedCheckpoint:
        _refuse_base(base, preset)
        return load_qwen_checkpoint(model or preset.model_id, dtype, device, quantization)

    def _compile(self, options: dict) -> None:
        """Compiles each repeated block (the classes transformers keeps whole on one device), at its first use."""
        blocks = set(getattr(self.model, "_no_split_modules", None) or ())
        for module in self.model.modules():
            if type(module).__name__ in blocks:
                module.compile(**options)

    @staticmethod
    def _image_config(model, base, preset: Preset) -> QwenImageConfig:
        _refuse_base(base, preset)  # as loading the model would: workers preprocessing apart learn it first
        return load_qwen_image_config(model or preset.model_id)

    def save_pretrained(self, out: str | os.PathLike) -> None:
        """Writes model, tokenizer (with chat template) and preprocessing as a checkpoint folder."""
        Path(out).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        (Path(out) / "preprocessor_config.json").write_text(json.dumps(self.image_config.to_dict(), indent=2))

    # ----------------------------------------------------------------------------------------------------------
    # Prompt
    # ----------------------------------------------------------------------------------------------------------
    def _prompt_parts(self, question: str, answer_prefix: str, **template_options) -> tuple[list[int], list[int]]:
        """The token ids before and after the image placeholder of the chat-template prompt: one user turn
        [image, question], the generation prompt, then `answer_prefix` (as the authors' code builds it)."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  **template_options) + answer_prefix
        ids = self.tokenizer(text)["input_ids"]
        if ids.count(self.image_token_id) != 1:
            raise CheckpointError(f"The chat template of {self.source} does not put one image placeholder into the "
                                  "prompt: download its chat_template.jinja again.")
        split = ids.index(self.image_token_id)
        return ids[:split], ids[split + 1 :]

    def _first_token(self, word: str) -> int:
        """The first token of " word" (else of "word"), as the authors' `level_token_ids` take it."""
        for text in (" " + word, word):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids:
                return ids[0]
        raise ValueError(f"The level word {word!r} has no tokens in this tokenizer.")

    def _model_inputs(self, pixels: QwenPixels, prompt_parts, left_pad: bool = False) -> tuple[dict, torch.Tensor]:
        """(keyword arguments for the model, each row's length) for one prompt per image, padded to one length."""
        before, after = prompt_parts
        counts = self.image_config.tokens_per_image(pixels.grid_thw).tolist()
        rows = [[*before, *[self.image_token_id] * count, *after] for count in counts]
        lengths = torch.tensor([len(row) for row in rows], device=self.device)
        longest = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, row in enumerate(rows):
            where = slice(longest - len(row), longest) if left_pad else slice(0, len(row))
            input_ids[i, where], attention_mask[i, where] = torch.tensor(row), 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        pixels = pixels.to(self.device, self.dtype)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": (input_ids == self.image_token_id).int(),  # 1 marks image tokens, as the processor's
            "pixel_values": pixels.patches,
            "image_grid_thw": pixels.grid_thw,
        }, lengths

    # ----------------------------------------------------------------------------------------------------------
    # Scoring
    # ----------------------------------------------------------------------------------------------------------
    def level_logits(self, pixel_values: QwenPixels) -> torch.Tensor:
        """Next-token logits [B, vocab] after each image's prompt."""
        inputs, lengths = self._model_inputs(pixel_values, self.prompt_parts)
        hidden = self.model.base_model(**inputs, use_cache=False).last_hidden_state
        last = hidden[torch.arange(len(lengths), device=hidden.device), lengths - 1]
        logits = self.model.get_output_embeddings()(last)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    # ----------------------------------------------------------------------------------------------------------
    # Descriptions
    # ----------------------------------------------------------------------------------------------------------
    def _description_prompt(self, question: str):
        return self._prompt_parts(question, "", enable_thinking=False)

    def generate_from_pixels(self, prompt_ids, pixel_values: QwenPixels, **generate_kwargs) -> torch.Tensor:
        """New token ids [B, n] after the description prompt (`prompt_ids`: its parts before and after the image)."""
        inputs, _ = self._model_inputs(pixel_values, prompt_ids, left_pad=True)  # generation appends on the right
        generated = self.model.generate(**inputs, pad_token_id=self.pad_token_id, **generate_kwargs)
        return generated[:, inputs["input_ids"].shape[1] :]

    def _decode(self, token_ids: torch.Tensor) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
