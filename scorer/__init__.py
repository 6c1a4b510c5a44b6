"""The scorer core: the mPLUG-Owl2 model, checkpoints, preprocessing, levels and `ArtQuantScorer`."""

from transformers import AutoConfig, AutoModelForCausalLM

from .checkpoint import CheckpointError, load_checkpoint
from .configuration_mplug_owl2 import MplugOwl2Config
from .images import ImageInputError, load_images
from .levels import expected_score, hard_label, score_std
from .modeling_mplug_owl2 import IMAGE_TOKEN_INDEX, MPLUGOwl2LlamaForCausalLM
from .preprocessing import ImageProcessingConfig, pixel_values_from_images
from .presets import PRESETS, Preset, get_preset
from .scoring import ArtQuantScorer, ImageScore, LevelScores
from .tokenizer import PromptTokenizer

AutoConfig.register("mplug_owl2", MplugOwl2Config, exist_ok=True)
AutoModelForCausalLM.register(MplugOwl2Config, MPLUGOwl2LlamaForCausalLM, exist_ok=True)

__all__ = [
    "ArtQuantScorer",
    "CheckpointError",
    "IMAGE_TOKEN_INDEX",
    "ImageInputError",
    "ImageProcessingConfig",
    "ImageScore",
    "LevelScores",
    "MPLUGOwl2LlamaForCausalLM",
    "MplugOwl2Config",
    "PRESETS",
    "Preset",
    "PromptTokenizer",
    "expected_score",
    "get_preset",
    "hard_label",
    "load_checkpoint",
    "load_images",
    "pixel_values_from_images",
    "score_std",
]
