"""The ArtQuant nodes in ComfyUI's V3 schema (`comfy_api.latest`): thin adapters over operations.py and guidance.py.

Imported only by `comfy_entrypoint`, i.e. inside ComfyUI (this module imports ComfyUI's own packages).
"""

from __future__ import annotations

import dataclasses

import torch
from comfy_api.latest import ComfyExtension, io
from comfy_execution.graph_utils import ExecutionBlocker

import comfy.model_management

from ..scorer import PRESETS
from .guidance import RewardGuidance, in_window
from .model_handle import (
    ArtQuantModel,
    folder_fingerprint,
    load_model,
    local_checkpoints,
    quantization_choices,
    register_model_folder,
    resolve_checkpoint,
)
from .operations import (
    check_threshold,
    describe_images,
    filter_mask,
    overlay_scores,
    rank_batch,
    reorder_latent,
    reorder_mask,
    score_images,
    score_report,
)

CATEGORY = "ArtQuant"
ArtQuantModelType = io.Custom("ARTQUANT_MODEL")
MODEL_TOOLTIP = "The scorer from Load ArtQuant model (loaded once and shared)."
IMAGES_TOOLTIP = "A batch of RGB images; every image is scored on its own."
AUTO_BASE = "(recorded in the release)"
NO_LOCAL_MODEL = "(none in models/artquant: type an id below)"
SEARCH_ALIASES = ["aesthetic", "quality", "score", "rank", "reward", "best of n"]
SCORE_LOW = min(p.score_range[0] for p in PRESETS.values())
SCORE_HIGH = max(p.score_range[1] for p in PRESETS.values())
SCHEMA_FIELDS = {field.name for field in dataclasses.fields(io.Schema)}


def schema(**fields) -> io.Schema:
    """An io.Schema in the ArtQuant category; search aliases where this ComfyUI supports them (newer than 0.3.64)."""
    if "search_aliases" in SCHEMA_FIELDS:
        fields.setdefault("search_aliases", SEARCH_ALIASES)
    return io.Schema(category=CATEGORY, **fields)


def blocked_if_empty(images: torch.Tensor):
    """An empty batch would crash most nodes after this one: an ExecutionBlocker skips them instead."""
    return images if images.shape[0] > 0 else ExecutionBlocker(None)


def devices() -> list[str]:
    found = ["auto", "cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return found + (["mps"] if torch.backends.mps.is_available() else [])


class ArtQuantLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        local = local_checkpoints()
        quantization = quantization_choices()
        optional = [
            io.Combo.Input("base", options=[AUTO_BASE] + local_checkpoints(full_only=True), optional=True,
                           tooltip="Base model of a LoRA release (full checkpoints only); by default the one the release records."),
            io.String.Input("model_id", default="", optional=True, placeholder="owner/name or /path/to/checkpoint",
                            tooltip="A Hugging Face id or a folder path; when set it replaces `model`."),
        ]
        if len(quantization) > 1:  # bitsandbytes is installed
            optional.append(io.Combo.Input("quantization", options=quantization, default="none", optional=True,
                                           tooltip="8-bit/4-bit LLM weights via bitsandbytes (CUDA only)."))
        return schema(
            node_id="ArtQuantLoader",
            display_name="Load ArtQuant model",
            description="Loads an ArtQuant (or DeQA-Score / OneAlign / Q-ReAlign) scorer. One copy of the weights "
            "per checkpoint, dtype and device is shared by every preset of its model family; ComfyUI moves it to and "
            "from the GPU like its other models and frees it with 'Free model and node cache'. Checkpoint folders go "
            "into models/artquant/.",
            inputs=[
                io.Combo.Input("preset", options=list(PRESETS), default="artquant",
                               tooltip="Question, level words and weights (applied at scoring time; the weights "
                               "are shared). qrealign-* presets need a Q-ReAlign (Qwen3.5-VL) checkpoint, the others "
                               "an mPLUG-Owl2 one."),
                io.Combo.Input("model", options=local or [NO_LOCAL_MODEL],
                               tooltip="A checkpoint folder in models/artquant/ (full model, ArtQuant LoRA "
                               "release or Q-ReAlign model)."),
                io.Combo.Input("dtype", options=["auto", "bf16", "fp16", "fp32"], default="auto",
                               tooltip="auto: bf16 on a GPU (fp16 without bf16), fp32 on the CPU."),
                io.Combo.Input("device", options=devices(), default="auto", tooltip="auto: ComfyUI's compute device."),
                *optional,
            ],
            outputs=[ArtQuantModelType.Output(display_name="artquant_model", tooltip="The scorer, for the other ArtQuant nodes.")],
        )

    @classmethod
    def chosen(cls, model, model_id="", base=AUTO_BASE) -> tuple[str, str | None]:
        chosen = resolve_checkpoint(model_id or ("" if model == NO_LOCAL_MODEL else model))
        return chosen, None if base == AUTO_BASE else resolve_checkpoint(base)

    @classmethod
    def fingerprint_inputs(cls, model, model_id="", base=AUTO_BASE, **_):
        """Re-executes when the checkpoint folder's files change (a folder replaced under the same name)."""
        try:
            chosen, base_path = cls.chosen(model, model_id, base)
        except Exception:  # execute reports it
            return (model, model_id, base)
        return folder_fingerprint(chosen), folder_fingerprint(base_path)

    @classmethod
    def execute(cls, preset, model, dtype, device, base=AUTO_BASE, model_id="", quantization="none"):
        chosen, base_path = cls.chosen(model, model_id, base)
        return io.NodeOutput(load_model(chosen, base_path, preset, dtype, device, quantization))


class ArtQuantScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ArtQuantScore",
            display_name="Score images (ArtQuant)",
            description="Scores every image of the batch (1 bad .. 10 excellent for ArtQuant, 0 .. 1 for Q-ReAlign), "
            "with its uncertainty (std).",
            inputs=[
                ArtQuantModelType.Input("artquant_model", tooltip=MODEL_TOOLTIP),
                io.Image.Input("images", tooltip=IMAGES_TOOLTIP),
                io.Int.Input("batch_size", default=8, min=1, max=256,
                             tooltip="Images per forward pass (memory vs speed); scores do not change."),
            ],
            outputs=[
                io.Float.Output(display_name="scores", tooltip="One score per image, in batch order.", is_output_list=True),
                io.Float.Output(display_name="stds", tooltip="One std per image.", is_output_list=True),
                io.String.Output(display_name="report", tooltip="A line per image and a summary."),
            ],
        )

    @classmethod
    def execute(cls, artquant_model, images, batch_size=8):
        results = score_images(artquant_model, images, batch_size)
        return io.NodeOutput([r.score for r in results], [r.std for r in results], score_report(results))


class ArtQuantRank(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ArtQuantRank",
            display_name="Rank images (ArtQuant)",
            description="Best-of-N: sorts a batch (e.g. a KSampler's, decoded) by score, best first, and keeps the top k "
            "with their latents. The top-k latent remembers each image's batch index, so a KSampler with the same seed "
            "re-creates its noise: upscale it and sample again to refine the winners.",
            inputs=[
                ArtQuantModelType.Input("artquant_model", tooltip=MODEL_TOOLTIP),
                io.Image.Input("images", tooltip=IMAGES_TOOLTIP),
                io.Int.Input("top_k", default=1, min=1, max=4096, tooltip="How many of the best images go to `top_k`."),
                io.Latent.Input("latent", optional=True, tooltip="The latents of these images; returned in the same order."),
                io.Mask.Input("mask", optional=True, tooltip="One mask per image; returned in the same order."),
                io.Int.Input("seed", optional=True, default=0, min=0, max=0xFFFFFFFFFFFFFFFF, force_input=True,
                             tooltip="The KSampler's seed (convert its widget to an input and link it): the report lists it per winner."),
            ],
            outputs=[
                io.Image.Output(display_name="sorted", tooltip="All images, best first."),
                io.Image.Output(display_name="top_k", tooltip="The k best."),
                io.Image.Output(display_name="rest", tooltip="The others (skipped downstream when there are none)."),
                io.Float.Output(display_name="sorted_scores", tooltip="Scores in sorted order.", is_output_list=True),
                io.Latent.Output(display_name="latent", tooltip="The latent, sorted like the images (with batch_index)."),
                io.Mask.Output(display_name="mask", tooltip="The mask, sorted like the images."),
                io.Latent.Output(display_name="top_k_latent", tooltip="The k best latents, each with its original batch_index."),
                io.String.Output(display_name="report", tooltip="Each winner's rank, seed, batch index and score."),
            ],
        )

    @classmethod
    def execute(cls, artquant_model, images, top_k, latent=None, mask=None, seed=None):
        ranking = rank_batch(artquant_model, images, top_k)
        order, batch = ranking.order, len(images)
        ranked = images[order]
        sorted_latent = reorder_latent(latent, order, batch) if latent is not None else None
        top_latent = None
        if sorted_latent is not None:
            top_latent = {**sorted_latent, "samples": sorted_latent["samples"][:top_k], "batch_index": sorted_latent["batch_index"][:top_k]}
            if isinstance(sorted_latent.get("noise_mask"), torch.Tensor) and sorted_latent["noise_mask"].shape[0] == batch:
                top_latent["noise_mask"] = sorted_latent["noise_mask"][:top_k]
        return io.NodeOutput(
            ranked, ranked[:top_k], blocked_if_empty(ranked[top_k:]), ranking.scores, sorted_latent,
            reorder_mask(mask, order, batch) if mask is not None else None, top_latent, ranking.report(seed),
        )


class ArtQuantFilter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ArtQuantFilter",
            display_name="Filter by score (ArtQuant)",
            description="Keeps the images that score at or above the threshold. When none pass, `images` carries "
            "nothing and the nodes after it are skipped; the report says so.",
            inputs=[
                ArtQuantModelType.Input("artquant_model", tooltip=MODEL_TOOLTIP),
                io.Image.Input("images", tooltip=IMAGES_TOOLTIP),
                io.Float.Input("threshold", default=6.0, min=SCORE_LOW, max=SCORE_HIGH, step=0.01,
                               tooltip="Minimum score to keep, inside the preset's range (ArtQuant 1 .. 10, DeQA-Score "
                               "and OneAlign 1 .. 5, Q-ReAlign 0 .. 1)."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="Images with score >= threshold, in batch order (skipped downstream when none pass)."),
                io.Image.Output(display_name="rejected", tooltip="The others (skipped downstream when there are none)."),
                io.Int.Output(display_name="count", tooltip="How many passed."),
                io.String.Output(display_name="report", tooltip="What passed and what did not."),
            ],
        )

    @classmethod
    def execute(cls, artquant_model, images, threshold):
        check_threshold(threshold, artquant_model.scorer.preset)
        keep, report = filter_mask([r.score for r in score_images(artquant_model, images)], threshold)
        return io.NodeOutput(blocked_if_empty(images[keep]), blocked_if_empty(images[~keep]), int(keep.sum()), report)


class ArtQuantDescribe(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ArtQuantDescribe",
            display_name="Describe image (ArtQuant)",
            description="Writes the model's aesthetic description of each image (perception, cognition, emotion). "
            "Cancel stops it within one token.",
            inputs=[
                ArtQuantModelType.Input("artquant_model", tooltip=MODEL_TOOLTIP),
                io.Image.Input("images", tooltip="The images to describe, one description each."),
                io.Int.Input("max_new_tokens", default=256, min=1, max=2048, tooltip="Length limit of each description, in tokens."),
                io.String.Input("question", multiline=True, default="", optional=True,
                                placeholder="Empty: the preset's question (Give a comprehensive analysis of the aesthetics of this painting.)",
                                tooltip="Empty: the preset's description question."),
            ],
            outputs=[io.String.Output(display_name="description", tooltip="The descriptions; with several images, one paragraph per image.")],
        )

    @classmethod
    def execute(cls, artquant_model, images, max_new_tokens, question=""):
        return io.NodeOutput(describe_images(artquant_model, images, max_new_tokens, question))


class ArtQuantScoreOverlay(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ArtQuantScoreOverlay",
            display_name="Score overlay (ArtQuant)",
            description="Draws each image's score and std on it, for previews and contact sheets.",
            inputs=[ArtQuantModelType.Input("artquant_model", tooltip=MODEL_TOOLTIP), io.Image.Input("images", tooltip=IMAGES_TOOLTIP)],
            outputs=[io.Image.Output(display_name="images", tooltip="The images with 'score ± std' in the top-left corner.")],
        )

    @classmethod
    def execute(cls, artquant_model, images):
        return io.NodeOutput(overlay_scores(artquant_model, images))


def decoded_size(vae, latent_shape) -> tuple[int, int]:
    """(height, width) of the images the VAE decodes from latents of `latent_shape` [B, C, h, w]."""
    ratio = vae.spacial_compression_decode()
    return latent_shape[-2] * ratio, latent_shape[-1] * ratio


def guided_chunk(vae, artquant_model: ArtQuantModel, latent_shape, device) -> int:
    """How many images to differentiate at once: what ComfyUI says is free, over one image's decode+score with the
    graph kept (roughly three inference decodes)."""
    one = [1, *latent_shape[1:]]
    scoring = artquant_model.weights.memory_required(1, keep_graph=True, image_size=decoded_size(vae, latent_shape))
    per_image = 3 * vae.memory_used_decode(one, vae.vae_dtype) + scoring
    return max(1, min(latent_shape[0], int(comfy.model_management.get_free_memory(device) // per_image)))


class ArtQuantGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ArtQuantGuidance",
            display_name="ArtQuant Guidance",
            description="Steers sampling towards higher ArtQuant scores, for any model family the VAE decodes and any "
            "sampler. Inside the window, each step's denoised prediction is decoded, scored, and moved up the score's "
            "gradient. Each guided step adds one VAE decode and one scorer forward+backward.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to guide (returned as a patched copy; the input stays as it is)."),
                ArtQuantModelType.Input("artquant_model", tooltip=MODEL_TOOLTIP),
                io.Vae.Input("vae", tooltip="The VAE of this model (decodes its latents)."),
                io.Float.Input("scale", default=0.1, min=0.0, max=2.0, step=0.01,
                               tooltip="Step length up the score's gradient, as a fraction of the prediction's RMS. 0 disables."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where guidance starts, as a fraction of the schedule (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where guidance ends, as a fraction of the schedule (1 = last step)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with ArtQuant guidance; connect it to a sampler.")],
        )

    @classmethod
    def validate_inputs(cls, start_percent, end_percent):
        # Named arguments (no **kwargs): ComfyUI still checks the other inputs' bounds itself.
        if not 0.0 <= start_percent <= 1.0 or not 0.0 <= end_percent <= 1.0:
            return f"start_percent and end_percent are fractions of the schedule in [0, 1], got {start_percent} and {end_percent}."
        if start_percent > end_percent:
            return f"start_percent ({start_percent}) is after end_percent ({end_percent}): guidance would never run."
        return True

    @classmethod
    def execute(cls, model, artquant_model, vae, scale, start_percent, end_percent):
        model_sampling = model.get_model_object("model_sampling")
        sigma_start = float(model_sampling.percent_to_sigma(start_percent))
        sigma_end = float(model_sampling.percent_to_sigma(end_percent))

        def guide(args):
            denoised = args["denoised"]
            if scale == 0 or not in_window(float(args["sigma"].max()), sigma_start, sigma_end):
                return denoised
            if denoised.ndim != 4:
                raise ValueError(f"ArtQuant Guidance guides image latents [B, C, H, W], got {tuple(denoised.shape)} (video?).")
            base_model = args["model"]
            chunk = guided_chunk(vae, artquant_model, denoised.shape, denoised.device)
            # Both on their device before the step, so nothing moves their weights while autograd borrows them.
            comfy.model_management.load_models_gpu([vae.patcher], force_full_load=vae.disable_offload)
            scorer = artquant_model.ready(chunk, keep_graph=True, image_size=decoded_size(vae, denoised.shape))
            guidance = RewardGuidance(
                decode=lambda latent: vae.decode(base_model.process_latent_out(latent)).movedim(-1, 1),
                reward=lambda images: scorer.score_tensor(images).scores,
                scale=scale, chunk=chunk, modules=(vae.first_stage_model, scorer.model),
            )
            return guidance(denoised)

        guided = model.clone()
        guided.set_model_sampler_post_cfg_function(guide)
        # Loaded with the diffusion model before sampling, so ComfyUI reserves room for all three (or offloads).
        extra = [vae.patcher] + ([artquant_model.patcher] if artquant_model.patcher is not None else [])
        guided.set_additional_models("artquant_guidance", extra)
        return io.NodeOutput(guided)


class ArtQuantExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [ArtQuantLoader, ArtQuantScore, ArtQuantRank, ArtQuantFilter, ArtQuantDescribe, ArtQuantScoreOverlay, ArtQuantGuidance]


__all__ = ["ArtQuantExtension", "register_model_folder"]
