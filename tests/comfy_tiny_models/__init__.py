"""Test-only ComfyUI node pack: tiny diffusion models built in-process from ComfyUI's own model classes.

test_comfy_integration.py links this folder into the test server's custom_nodes/. "Tiny ArtQuant test model" gives
a MODEL, a VAE and a CONDITIONING of one of two families, shaped like the real ones but with a few thousand
parameters and fixed random weights:
- sd1-eps:  SD 1.x (ComfyUI's `SD15` config: UNetModel, epsilon prediction, 4-channel SD latents);
- sd3-flow: SD 3 (ComfyUI's `SD3` config: MMDiT, rectified-flow sampling, 16-channel SD3 latents).
Each VAE is ComfyUI's AutoencoderKL with an 8x up-sampling decoder, like the real ones.
"""

import torch

import comfy.sd
import comfy.supported_models

SD1_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1], "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "context_dim": 32, "num_heads": 2, "num_head_channels": -1,
    "use_linear_in_transformer": False, "use_temporal_attention": False, "use_temporal_resblock": False,
}
SD3_MMDIT = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None, "adm_in_channels": None,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
    "num_patches": 256, "pos_embed_max_size": 16, "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
}
CONTEXT_DIM = 32


def fill_weights(module: torch.nn.Module, seed: int, std: float) -> torch.nn.Module:
    """ComfyUI's layers skip weight initialisation (checkpoints overwrite it): fixed random weights instead."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim == 1:
                parameter.copy_(torch.ones_like(parameter) if "norm" in name and name.endswith("weight") else torch.zeros_like(parameter))
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
        for buffer in module.buffers():  # e.g. MMDiT's position embedding, left as uninitialised memory
            if buffer.is_floating_point():
                buffer.zero_()
    return module


def tiny_vae(latent_channels: int, seed: int) -> comfy.sd.VAE:
    ddconfig = {"double_z": True, "z_channels": latent_channels, "resolution": 64, "in_channels": 3, "out_ch": 3,
                "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    config = {"params": {"embed_dim": latent_channels, "ddconfig": ddconfig}}
    from comfy.ldm.models.autoencoder import AutoencoderKL

    weights = fill_weights(AutoencoderKL(embed_dim=latent_channels, ddconfig=ddconfig), seed, 0.05).state_dict()
    return comfy.sd.VAE(sd=weights, config=config, device=torch.device("cpu"), dtype=torch.float32)


def tiny_model(family: str, seed: int):
    import comfy.model_management
    import comfy.model_patcher

    if family == "sd1-eps":
        config = comfy.supported_models.SD15(dict(SD1_UNET))
    else:
        config = comfy.supported_models.SD3(dict(SD3_MMDIT))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    fill_weights(model.diffusion_model, seed, 0.05)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    vae = tiny_vae(config.latent_format.latent_channels, seed + 1)
    context = torch.randn(1, 4, CONTEXT_DIM, generator=torch.Generator().manual_seed(seed + 2))
    conditioning = [[context, {"pooled_output": torch.zeros(1, 8)}]]
    return patcher, vae, conditioning


class TinyArtQuantTestModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (["sd1-eps", "sd3-flow"],), "seed": ("INT", {"default": 0, "min": 0, "max": 1000})}}

    RETURN_TYPES = ("MODEL", "VAE", "CONDITIONING")
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, family, seed):
        return tiny_model(family, seed)  # under ComfyUI's inference mode, like a checkpoint loader's weights


NODE_CLASS_MAPPINGS = {"TinyArtQuantTestModel": TinyArtQuantTestModel}
