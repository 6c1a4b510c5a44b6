"""Configuration of mPLUG-Owl2 (LLaMA-2 with modality-adaptive K/V/norms, a ViT-L/14 and a visual abstractor).

`config.json` files written by the reference code (model_type "mplug_owl2") load unchanged: the LLaMA fields at
the top level, the vision model and the abstractor under `visual_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


@dataclass(frozen=True)
class MplugOwlVisionConfig:
    """ViT of mPLUG-Owl2. Defaults are the reference's (ViT-L/14 at 448 px)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 448
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @property
    def num_positions(self) -> int:
        """Patch tokens plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class MplugOwlVisualAbstractorConfig:
    """Visual abstractor (learnable queries cross-attending to ViT tokens). Defaults are the reference's."""

    num_learnable_queries: int = 64
    hidden_size: int = 1024
    num_hidden_layers: int = 6
    num_attention_heads: int = 16
    intermediate_size: int = 2816
    layer_norm_eps: float = 1e-6
    encoder_hidden_size: int = 1024
    grid_size: int = 32


def _known_fields(cls, values: dict | None) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in (values or {}).items() if k in names and v is not None}


@strict
class MplugOwl2Config(LlamaConfig):
    r"""LLaMA configuration plus `visual_config = {"visual_model": {...}, "visual_abstractor": {...}}`."""

    model_type = "mplug_owl2"

    visual_config: dict | None = None

    def __post_init__(self, **kwargs):
        given = self.visual_config or {}
        self.visual_config = {
            "visual_model": {**MplugOwlVisionConfig().__dict__, **_known_fields(MplugOwlVisionConfig, given.get("visual_model"))},
            "visual_abstractor": {
                **MplugOwlVisualAbstractorConfig().__dict__,
                **_known_fields(MplugOwlVisualAbstractorConfig, given.get("visual_abstractor")),
            },
        }
        super().__post_init__(**kwargs)

    @property
    def vision_config(self) -> MplugOwlVisionConfig:
        return MplugOwlVisionConfig(**self.visual_config["visual_model"])

    @property
    def abstractor_config(self) -> MplugOwlVisualAbstractorConfig:
        return MplugOwlVisualAbstractorConfig(**self.visual_config["visual_abstractor"])

    @property
    def num_visual_tokens(self) -> int:
        """Tokens one image occupies in the language model: the abstractor's queries plus `vit_eos`."""
        return self.abstractor_config.num_learnable_queries + 1
