"""mPLUG-Owl2 on current transformers: ViT-L/14 -> visual abstractor -> modality-adaptive LLaMA-2.

Module and attribute names equal the reference's state-dict keys, so its checkpoints load without a key mapping.
What differs from plain LLaMA: K, V and both RMSNorms of every decoder layer exist twice (`multiway.0` for text
tokens, `multiway.1` for visual tokens); Q and O are shared. The model only computes; prompts, level words and
scores live in `scorer.scoring`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_mplug_owl2 import MplugOwl2Config, MplugOwlVisionConfig, MplugOwlVisualAbstractorConfig

IMAGE_TOKEN_INDEX = -200  # the reference splices each image in at this placeholder id
IGNORE_INDEX = -100
TEXT, VISUAL = 0, 1  # modality indicators: which `multiway` branch a token uses


# ----------------------------------------------------------------------------------------------------------------
# Vision transformer
# ----------------------------------------------------------------------------------------------------------------
class MplugOwlVisionEmbeddings(nn.Module):
    def __init__(self, config: MplugOwlVisionConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embed = nn.Conv2d(3, config.hidden_size, config.patch_size, config.patch_size, bias=False)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_positions, config.hidden_size))
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(patches.shape[0], 1, -1).to(patches.dtype)
        embeddings = torch.cat([cls, patches], dim=1)
        embeddings = embeddings + self.position_embedding[:, : embeddings.shape[1]].to(patches.dtype)
        return self.pre_layernorm(embeddings)


class MplugOwlVisionAttention(nn.Module):
    def __init__(self, config: MplugOwlVisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden_states.shape
        # The fused projection is laid out per head as (q, k, v): reshape to (b, s, heads, 3, d).
        qkv = self.query_key_value(hidden_states).reshape(batch, length, self.num_heads, 3, self.head_dim)
        query, key, value = qkv.permute(3, 0, 2, 1, 4).unbind(0)
        context = F.scaled_dot_product_attention(query, key, value)
        return self.dense(context.transpose(1, 2).reshape(batch, length, width))


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class MplugOwlMLP(nn.Module):
    def __init__(self, config: MplugOwlVisionConfig):
        super().__init__()
        self.activation_fn = QuickGELU()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class MplugOwlVisionEncoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MplugOwlVisionConfig):
        super().__init__()
        self.self_attn = MplugOwlVisionAttention(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MplugOwlMLP(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states))
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class MplugOwlVisionEncoder(nn.Module):
    def __init__(self, config: MplugOwlVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([MplugOwlVisionEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


class MplugOwlVisionModel(nn.Module):
    def __init__(self, config: MplugOwlVisionConfig):
        super().__init__()
        self.embeddings = MplugOwlVisionEmbeddings(config)
        self.encoder = MplugOwlVisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`pixel_values` [B, 3, S, S] (CLIP-normalised) -> tokens [B, 1 + (S/patch)^2, hidden]."""
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))


# ----------------------------------------------------------------------------------------------------------------
# Visual abstractor
# ----------------------------------------------------------------------------------------------------------------
def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """MAE's 1-D sin-cos embedding, [len(positions), dim] (float32 arithmetic, as the reference)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float32) / (dim / 2.0))
    angles = np.einsum("m,d->md", positions.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d_with_cls(dim: int, grid_size: int) -> np.ndarray:
    """MAE's 2-D sin-cos embedding of a grid, with a zero row in front for the class token."""
    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    embedding = np.concatenate([sincos_1d(dim // 2, grid_w), sincos_1d(dim // 2, grid_h)], axis=1)
    return np.concatenate([np.zeros([1, dim]), embedding], axis=0)


class MplugOwlVisualAbstractorMultiHeadAttention(nn.Module):
    def __init__(self, config: MplugOwlVisualAbstractorConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.encoder_hidden_size, config.hidden_size)
        self.value = nn.Linear(config.encoder_hidden_size, config.hidden_size)
        # Fixed position embeddings, saved in checkpoints (persistent buffers); recomputed by `_init_weights`.
        self.register_buffer("q_pos_embed", self.query_position_embedding(config))
        self.register_buffer("k_pos_embed", self.key_position_embedding(config))

    @staticmethod
    def query_position_embedding(config: MplugOwlVisualAbstractorConfig) -> torch.Tensor:
        positions = np.arange(config.num_learnable_queries, dtype=np.float32)
        return torch.from_numpy(sincos_1d(config.hidden_size, positions)).float()

    @staticmethod
    def key_position_embedding(config: MplugOwlVisualAbstractorConfig) -> torch.Tensor:
        return torch.from_numpy(sincos_2d_with_cls(config.hidden_size, config.grid_size)).float()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """`queries` [B, Q, D] attend to `keys` = [queries; image tokens] [B, Q + N, D]; returns [B, Q, D]."""
        dtype = queries.dtype
        key_positions = torch.cat([self.q_pos_embed, self.k_pos_embed], dim=0).to(dtype)
        query = self._heads(self.query(queries + self.q_pos_embed.to(dtype)))
        key = self._heads(self.key(keys + key_positions))
        value = self._heads(self.value(keys))
        context = F.scaled_dot_product_attention(query, key, value)
        return context.transpose(1, 2).flatten(2)


class MplugOwlVisualAbstractorMLP(nn.Module):
    def __init__(self, config: MplugOwlVisualAbstractorConfig):
        super().__init__()
        self.act = nn.SiLU()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_ln = nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.w2(self.ffn_ln(self.act(self.w1(hidden_states)) * self.w3(hidden_states)))


class MplugOwlVisualAbstractorCrossOutput(nn.Module):
    def __init__(self, config: MplugOwlVisualAbstractorConfig):
        super().__init__()
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm2 = nn.LayerNorm(config.hidden_size)  # torch's default eps (1e-5), as the reference
        self.mlp = MplugOwlVisualAbstractorMLP(config)

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        hidden_states = residual + self.out_proj(context)
        return hidden_states + self.mlp(self.norm2(hidden_states))


class MplugOwlVisualAbstractorAttention(nn.Module):
    def __init__(self, config: MplugOwlVisualAbstractorConfig):
        super().__init__()
        self.attention = MplugOwlVisualAbstractorMultiHeadAttention(config)
        self.output = MplugOwlVisualAbstractorCrossOutput(config)
        self.norm1 = nn.LayerNorm(config.hidden_size)  # eps 1e-5, as the reference
        self.normk = nn.LayerNorm(config.hidden_size)

    def forward(self, queries: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        queries = self.norm1(queries)
        keys = torch.cat([queries, self.normk(image_tokens)], dim=1)
        # The residual is the *normalised* queries, as in the reference.
        return self.output(self.attention(queries, keys), queries)


class MplugOwlVisualAbstractorLayer(GradientCheckpointingLayer):
    def __init__(self, config: MplugOwlVisualAbstractorConfig):
        super().__init__()
        self.crossattention = MplugOwlVisualAbstractorAttention(config)

    def forward(self, queries: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.crossattention(queries, image_tokens)


class MplugOwlVisualAbstractorEncoder(nn.Module):
    def __init__(self, config: MplugOwlVisualAbstractorConfig):
        super().__init__()
        self.layers = nn.ModuleList([MplugOwlVisualAbstractorLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, queries: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            queries = layer(queries, image_tokens)
        return queries


class MplugOwlVisualAbstractorModel(nn.Module):
    def __init__(self, config: MplugOwlVisualAbstractorConfig, language_hidden_size: int):
        super().__init__()
        self.encoder = MplugOwlVisualAbstractorEncoder(config)
        self.visual_fc = nn.Linear(config.hidden_size, language_hidden_size)
        self.query_embeds = nn.Parameter(torch.zeros(1, config.num_learnable_queries, config.hidden_size))
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, language_hidden_size))

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """ViT tokens [B, N, D_vit] -> visual tokens for the LLM [B, queries + 1, D_llm]."""
        batch = image_tokens.shape[0]
        queries = self.encoder(self.query_embeds.expand(batch, -1, -1), image_tokens)
        return torch.cat([self.visual_fc(queries), self.vit_eos.expand(batch, -1, -1)], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Modality-adaptive LLaMA
# ----------------------------------------------------------------------------------------------------------------
class MultiwayNetwork(nn.Module):
    """Two copies of a module: `multiway.0` for text tokens, `multiway.1` for visual tokens."""

    def __init__(self, make_module, num_multiway: int = 2):
        super().__init__()
        self.multiway = nn.ModuleList([make_module() for _ in range(num_multiway)])

    def forward(self, hidden_states: torch.Tensor, routing: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """`routing`: flat indices into `hidden_states.flatten(0, 1)` of the (text, visual) tokens; None: all text."""
        if routing is None:
            return self.multiway[TEXT](hidden_states)
        flat = hidden_states.flatten(0, 1)
        # Each token goes through its own branch only: in a scoring prompt most tokens are visual.
        outputs = [self.multiway[branch](flat.index_select(0, positions)) for branch, positions in enumerate(routing)]
        merged = outputs[TEXT].new_empty(flat.shape[0], outputs[TEXT].shape[-1])
        for positions, output in zip(routing, outputs):
            merged.index_copy_(0, positions, output)
        return merged.view(*hidden_states.shape[:-1], -1)


class MplugOwl2Attention(nn.Module):
    def __init__(self, config: MplugOwl2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        kv_width = config.num_key_value_heads * self.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = MultiwayNetwork(lambda: nn.Linear(config.hidden_size, kv_width, bias=bias))
        self.v_proj = MultiwayNetwork(lambda: nn.Linear(config.hidden_size, kv_width, bias=bias))
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, hidden_states, routing, position_embeddings, attention_mask, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states, routing).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states, routing).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, _ = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(output.reshape(*input_shape, -1).contiguous())


class MplugOwl2DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MplugOwl2Config, layer_idx: int):
        super().__init__()
        self.self_attn = MplugOwl2Attention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = MultiwayNetwork(lambda: LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps))
        self.post_attention_layernorm = MultiwayNetwork(
            lambda: LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        )

    def forward(self, hidden_states, routing, position_embeddings, attention_mask, cache=None, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states, routing)
        hidden_states = residual + self.self_attn(
            hidden_states, routing, position_embeddings, attention_mask, cache, **kwargs
        )
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states, routing)
        return residual + self.mlp(hidden_states)


class MplugOwl2PreTrainedModel(PreTrainedModel):
    config_class = MplugOwl2Config
    config: MplugOwl2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MplugOwl2DecoderLayer", "MplugOwlVisionEncoderLayer", "MplugOwlVisualAbstractorLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MplugOwlVisionEmbeddings):
            init.normal_(module.cls_token, std=std)
            init.normal_(module.position_embedding, std=std)
        elif isinstance(module, MplugOwlVisualAbstractorModel):
            init.normal_(module.query_embeds, std=std)
            init.normal_(module.vit_eos, std=std)
        elif isinstance(module, MplugOwlVisualAbstractorMultiHeadAttention):
            init.copy_(module.q_pos_embed, module.query_position_embedding(module.config))
            init.copy_(module.k_pos_embed, module.key_position_embedding(module.config))


class MplugOwl2LlamaModel(MplugOwl2PreTrainedModel):
    """The LLM body plus the vision tower and the abstractor (`model.*` in the reference's checkpoints)."""

    def __init__(self, config: MplugOwl2Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([MplugOwl2DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.vision_model = MplugOwlVisionModel(config.vision_config)
        self.visual_abstractor = MplugOwlVisualAbstractorModel(config.abstractor_config, config.hidden_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised pixels [B, 3, S, S] -> visual tokens for the LLM [B, num_visual_tokens, hidden]."""
        pixel_values = pixel_values.to(self.vision_model.embeddings.patch_embed.weight.dtype)
        return self.visual_abstractor(self.vision_model(pixel_values))

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        modality_indicators: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, Cache | None]:
        """Runs the decoder on embeddings; `modality_indicators` [B, T] marks visual tokens with 1 (None: all text)."""
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        routing = None  # computed once here rather than in every layer
        if modality_indicators is not None and bool(modality_indicators.any()):
            is_visual = modality_indicators.flatten() == VISUAL
            routing = ((~is_visual).nonzero().squeeze(1), is_visual.nonzero().squeeze(1))
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, routing, position_embeddings, causal_mask, cache, **kwargs)
        return self.norm(hidden_states), cache


class PromptPrefixLayer(DynamicLayer):
    """One decoder layer's prefix keys/values [1, kv_heads, P, head_dim]. Each call gets them, expanded to its batch,
    joined with its own keys/values; nothing is stored, so a checkpointed layer's backward replay sees the same."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        batch = key_states.shape[0]
        return (
            torch.cat([self.keys.expand(batch, -1, -1, -1), key_states], dim=-2),
            torch.cat([self.values.expand(batch, -1, -1, -1), value_states], dim=-2),
        )


class PromptPrefixCache(Cache):
    """Keys and values of a text-only prompt prefix, computed once at batch 1 and shared by every later batch.

    The prefix holds text tokens only, so these are the text-branch (`multiway.0`) K/V of each layer, rotated for
    positions 0 .. length - 1. Passed as a forward pass's `cache`, it is read only: the pass runs just the rest of
    the prompt, at positions `length`, `length + 1`, ... (the model derives them from the cache's length).
    `for_batch` gives `generate` a growing cache that starts with the prefix.
    """

    def __init__(self, key_values: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__(layers=[PromptPrefixLayer(keys, values) for keys, values in key_values])

    @property
    def length(self) -> int:
        return self.get_seq_length()

    def for_batch(self, batch: int) -> DynamicCache:
        """A fresh `DynamicCache` for `batch` rows that holds the prefix as expanded views (stride 0: no copy)."""
        cache = DynamicCache()
        for prefix in self.layers:
            layer = DynamicLayer()
            layer.lazy_initialization(prefix.keys, prefix.values)
            layer.keys, layer.values = prefix.keys.expand(batch, -1, -1, -1), prefix.values.expand(batch, -1, -1, -1)
            cache.layers.append(layer)
        return cache


class MPLUGOwl2LlamaForCausalLM(MplugOwl2PreTrainedModel, GenerationMixin):
    """mPLUG-Owl2 with its LM head. Inputs: token ids with `IMAGE_TOKEN_INDEX` where each image goes."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MplugOwl2Config):
        super().__init__(config)
        self.model = MplugOwl2LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def compile_blocks(self, **compile_kwargs) -> None:
        """`torch.compile`s in place the vision tower, the abstractor and each of the LLM's decoder layers (the LLM's
        layers share one compiled graph: regional compilation, built in a fraction of the whole model's time; the
        LM head and the mask building stay eager). Weights and state-dict keys stay as they are; `compile_kwargs`
        go to `torch.compile` (e.g. `mode="max-autotune"`)."""
        body = self.model
        body.vision_model.compile(**compile_kwargs)
        body.visual_abstractor.compile(**compile_kwargs)
        for layer in body.layers:
            layer.compile(**compile_kwargs)

    def encode_prompt_prefix(self, input_ids: torch.LongTensor) -> PromptPrefixCache:
        """Runs the text-only `input_ids` [P] or [1, P] (the prompt before its image) through the LLM and keeps
        each layer's keys/values. Plain tensors without gradients, even when called inside `torch.inference_mode`,
        so that a differentiable forward pass can use them too."""
        ids = input_ids.reshape(1, -1)
        if bool((ids == IMAGE_TOKEN_INDEX).any()):
            raise ValueError("A prompt prefix to cache must be text only: cut it before the image placeholder.")
        with torch.inference_mode(False), torch.no_grad():
            _, cache = self.model(self.model.embed_tokens(ids), use_cache=True)
        return PromptPrefixCache([(layer.keys, layer.values) for layer in cache.layers])

    def embed_multimodal(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Splices each image's visual tokens in at its `IMAGE_TOKEN_INDEX` placeholder.

        Images are taken in row-major placeholder order. Sequences of different expanded length are right-padded
        (zero embeddings, attention mask 0, label `IGNORE_INDEX`), as the reference does. Returns `inputs_embeds`
        [B, T, D], `modality_indicators` [B, T], and `attention_mask` and `labels` expanded to T (None if not given).
        Pass precomputed `image_features` [N, V, D] instead of `pixel_values` to reuse an encoding.
        """
        is_image = input_ids == IMAGE_TOKEN_INDEX
        image_rows, image_cols = is_image.nonzero(as_tuple=True)
        if image_features is None and len(image_rows):
            if pixel_values is None:
                raise ValueError("input_ids contain image placeholders but no pixel_values were given.")
            image_features = self.model.encode_images(pixel_values)
        num_images = 0 if image_features is None else image_features.shape[0]
        if num_images != len(image_rows):
            raise ValueError(f"{len(image_rows)} image placeholders in input_ids but {num_images} images were given.")

        batch = input_ids.shape[0]
        num_visual = self.config.num_visual_tokens
        widths = torch.where(is_image, num_visual, 1)
        starts = widths.cumsum(1) - widths  # where each input token lands in the expanded sequence
        lengths = widths.sum(1)
        total = int(lengths.max())
        text_rows, text_cols = (~is_image).nonzero(as_tuple=True)
        text_targets = starts[text_rows, text_cols]
        token_embeds = self.model.embed_tokens(input_ids[text_rows, text_cols])

        embeds = token_embeds.new_zeros(batch, total, token_embeds.shape[-1])
        embeds = embeds.index_put((text_rows, text_targets), token_embeds)
        modality = torch.zeros(batch, total, dtype=torch.long, device=input_ids.device)
        if num_images:
            offsets = torch.arange(num_visual, device=input_ids.device)
            image_targets = starts[image_rows, image_cols][:, None] + offsets
            rows = image_rows[:, None].expand_as(image_targets)
            embeds = embeds.index_put((rows, image_targets), image_features.to(embeds.dtype))
            modality[rows, image_targets] = VISUAL

        expanded_mask = None
        if attention_mask is not None or bool((lengths != total).any()):
            given = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            expanded_mask = torch.zeros(batch, total, dtype=given.dtype, device=input_ids.device)
            expanded_mask[text_rows, text_targets] = given[text_rows, text_cols]
            expanded_mask[modality == VISUAL] = 1
        expanded_labels = None
        if labels is not None:
            expanded_labels = torch.full((batch, total), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
            expanded_labels[text_rows, text_targets] = labels[text_rows, text_cols]
        return {
            "inputs_embeds": embeds,
            "modality_indicators": modality,
            "attention_mask": expanded_mask,
            "labels": expanded_labels,
        }

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        modality_indicators: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Either `input_ids` (+ `pixel_values` for their placeholders) or `inputs_embeds` (+ `modality_indicators`).

        `labels` are expanded with the image positions when given with `input_ids`; the loss is the plain shifted
        cross-entropy. `logits_to_keep=1` computes the LM head at the last position only.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if input_ids is not None:
            if pixel_values is not None or bool((input_ids == IMAGE_TOKEN_INDEX).any()):
                spliced = self.embed_multimodal(input_ids, pixel_values, attention_mask, labels)
                inputs_embeds, modality_indicators = spliced["inputs_embeds"], spliced["modality_indicators"]
                attention_mask, labels = spliced["attention_mask"], spliced["labels"]
            else:
                inputs_embeds = self.model.embed_tokens(input_ids)
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        hidden_states, cache = self.model(
            inputs_embeds,
            modality_indicators,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=IGNORE_INDEX
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def prepare_inputs_for_generation(
        self, input_ids, inputs_embeds=None, modality_indicators=None, is_first_iteration=False, **kwargs
    ):
        inputs = super().prepare_inputs_for_generation(
            input_ids, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        # Visual tokens only exist in the prompt; every generated token is text (the cache keeps the rest).
        if is_first_iteration and modality_indicators is not None:
            embeds = inputs.get("inputs_embeds")
            length = (embeds if embeds is not None else inputs["input_ids"]).shape[1]
            # A prefilled cache (a cached prompt prefix) leaves only the prompt's last `length` positions to run.
            inputs["modality_indicators"] = modality_indicators[:, -length:]
        else:
            inputs["modality_indicators"] = None
        return inputs


__all__ = [
    "IMAGE_TOKEN_INDEX",
    "IGNORE_INDEX",
    "MPLUGOwl2LlamaForCausalLM",
    "MplugOwl2LlamaModel",
    "MplugOwl2PreTrainedModel",
    "PromptPrefixCache",
]
