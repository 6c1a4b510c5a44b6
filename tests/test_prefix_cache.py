"""Prefix caching: the prompt's text before the image is run once per scorer and its keys/values reused.

With and without the cache the LLM computes the same attention, only with different matmul shapes, so the logits
agree to float32 rounding: within 1e-5 here (the golden tolerance is 1e-4).
"""

from contextlib import contextmanager

import pytest
import torch

from artquant import ArtQuantScorer
from artquant.scorer import IMAGE_TOKEN_INDEX, load_images, pixel_values_from_images

SAME_COMPUTATION = 1e-5  # fp32, with vs without the cache
GOLDEN = 1e-4  # the fixture's tolerance for last-position logits


@pytest.fixture(scope="module")
def pixel_values(base_scorer, reference_images):
    images = load_images(reference_images)
    return torch.cat([pixel_values_from_images(image[None], base_scorer.image_config) for image in images])


@pytest.fixture
def own_scorer(reference_dir):
    """A scorer this test may change (the session's scorers are shared)."""
    return ArtQuantScorer.from_pretrained(reference_dir / "mplug_owl2_base", device="cpu", dtype="fp32")


@contextmanager
def llm_input_lengths(scorer):
    """Records the sequence length of every pass through the first decoder layer."""
    lengths = []
    handle = scorer.model.model.layers[0].register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    try:
        yield lengths
    finally:
        handle.remove()


@contextmanager
def caching(scorer, enabled):
    previous, scorer.prefix_caching = scorer.prefix_caching, enabled
    try:
        yield
    finally:
        scorer.prefix_caching = previous


def logits_with_and_without_cache(scorer, pixel_values):
    with torch.no_grad():
        with caching(scorer, True):
            cached = scorer.level_logits(pixel_values)
        with caching(scorer, False):
            full = scorer.level_logits(pixel_values)
    return cached, full


@pytest.mark.parametrize("name", ["base", "merged"])
def test_cached_prefix_keeps_golden_parity(name, base_scorer, lora_scorer, pixel_values, golden_tensors):
    scorer = base_scorer if name == "base" else lora_scorer
    cached, full = logits_with_and_without_cache(scorer, pixel_values)
    assert (cached - golden_tensors[f"{name}.last_logits"]).abs().max() <= GOLDEN
    assert (cached - full).abs().max() <= SAME_COMPUTATION


def test_prefix_runs_once_and_batches_run_only_the_rest(own_scorer, reference_images):
    prompt = own_scorer.prompt_ids.tolist()
    prefix_length = prompt.index(IMAGE_TOKEN_INDEX)
    expanded_length = len(prompt) - 1 + own_scorer.model.config.num_visual_tokens
    with caching(own_scorer, True), llm_input_lengths(own_scorer) as lengths:
        own_scorer.score(reference_images, batch_size=4)
        own_scorer.score(reference_images[:2], batch_size=4)
    # One prefix pass, then three batches of the image and the text after it only.
    assert lengths == [prefix_length] + [expanded_length - prefix_length] * 3
    with caching(own_scorer, False), llm_input_lengths(own_scorer) as lengths:
        own_scorer.score(reference_images[:2])
    assert lengths == [expanded_length]


def test_prefix_is_read_only_and_batch_rows_are_views_of_it(base_scorer, pixel_values):
    with torch.no_grad():
        base_scorer.level_logits(pixel_values)
        prefix = base_scorer._prompt_prefix(base_scorer.prompt_ids)
    assert prefix.length == base_scorer.prompt_ids.tolist().index(IMAGE_TOKEN_INDEX)
    keys = prefix.layers[0].keys
    before = keys.clone()
    with torch.no_grad():
        base_scorer.level_logits(pixel_values)
    assert prefix.layers[0].keys is keys and torch.equal(keys, before), "a forward pass must not write into it"
    assert prefix.get_seq_length() == prefix.length
    layer = prefix.for_batch(5).layers[0]  # for `generate`, which grows its cache
    assert layer.keys.shape[0] == 5 and layer.keys.stride(0) == 0 and layer.values.stride(0) == 0
    assert layer.keys.data_ptr() == keys.data_ptr(), "expanding must not copy"


def test_changed_weights_recompute_the_prefix(own_scorer, pixel_values):
    with torch.no_grad():
        before = own_scorer.level_logits(pixel_values)
        # The text branch's K projection of the first layer: it shapes the cached prefix keys.
        own_scorer.model.model.layers[0].self_attn.k_proj.multiway[0].weight.mul_(3.0)
    cached, full = logits_with_and_without_cache(own_scorer, pixel_values)
    assert (cached - before).abs().max() > 1e-3, "the change must matter, or this test proves nothing"
    assert (cached - full).abs().max() <= SAME_COMPUTATION


def test_replaced_weights_recompute_the_prefix(own_scorer, pixel_values):
    with torch.no_grad():
        own_scorer.level_logits(pixel_values)
    embed = own_scorer.model.model.embed_tokens
    embed.weight = torch.nn.Parameter(embed.weight.detach() * 2, requires_grad=False)
    cached, full = logits_with_and_without_cache(own_scorer, pixel_values)
    assert (cached - full).abs().max() <= SAME_COMPUTATION


def test_training_bypasses_the_cache_and_gradients_reach_the_prefix(own_scorer, pixel_values):
    with torch.no_grad():
        own_scorer.level_logits(pixel_values[:1])  # fill the cache
    weight = own_scorer.model.model.layers[0].self_attn.k_proj.multiway[0].weight
    own_scorer.model.requires_grad_(False)
    weight.requires_grad_(True)
    with llm_input_lengths(own_scorer) as lengths:
        own_scorer.level_logits(pixel_values[:1])[0, own_scorer.level_ids].sum().backward()
    assert lengths == [len(own_scorer.prompt_ids) - 1 + own_scorer.model.config.num_visual_tokens]
    assert weight.grad is not None and weight.grad.abs().sum() > 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_pixel_gradients_equal_with_and_without_cache(own_scorer, checkpointing):
    """The reward's differentiable path: frozen weights (as the reward freezes them), gradients to the pixels, the
    prefix cached beforehand under inference mode (as `score` fills it); with activation checkpointing the backward
    pass replays each layer, which must see the same prefix again."""
    own_scorer.model.requires_grad_(False)
    images = torch.rand(2, 3, 40, 52, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        own_scorer.score_tensor(images)
    if checkpointing:
        own_scorer.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        own_scorer.model.train()
    expanded_length = len(own_scorer.prompt_ids) - 1 + own_scorer.model.config.num_visual_tokens
    prefix_length = own_scorer.prompt_ids.tolist().index(IMAGE_TOKEN_INDEX)
    gradients = []
    for enabled in (True, False):
        pixels = images.clone().requires_grad_(True)
        with caching(own_scorer, enabled), llm_input_lengths(own_scorer) as lengths:
            own_scorer.score_tensor(pixels).scores.sum().backward()
        gradients.append(pixels.grad)
        assert lengths[0] == (expanded_length - prefix_length if enabled else expanded_length)
    assert gradients[0].abs().max() > 0
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-4, atol=1e-6)


def test_generation_with_cached_prefix_equals_generation_without(own_scorer, pixel_values):
    prompt = torch.tensor(own_scorer.tokenizer.encode_with_images(own_scorer.preset.prompt(answer_prefix="")))
    runs = {}
    for enabled in (True, False):
        with torch.no_grad(), caching(own_scorer, enabled), llm_input_lengths(own_scorer) as lengths:
            runs[enabled] = own_scorer.generate_from_pixels(prompt, pixel_values[:3], max_new_tokens=8, do_sample=False)
        runs[enabled, "first pass"] = lengths[1] if enabled else lengths[0]
    assert torch.equal(runs[True], runs[False])
    expanded_length = len(prompt) - 1 + own_scorer.model.config.num_visual_tokens
    assert runs[False, "first pass"] == expanded_length
    assert runs[True, "first pass"] == expanded_length - prompt.tolist().index(IMAGE_TOKEN_INDEX)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ([1, 450, 2, IMAGE_TOKEN_INDEX, 29871], "cached"),
        ([IMAGE_TOKEN_INDEX, 450, 2], None),  # nothing before the image
        ([1, 450, 2], None),  # no image
    ],
)
def test_which_prompts_get_a_cached_prefix(base_scorer, prompt, expected):
    with torch.no_grad():
        prefix = base_scorer._prompt_prefix(torch.tensor(prompt))
    assert (prefix is not None) == (expected == "cached")
    if prefix is not None:
        assert prefix.length == prompt.index(IMAGE_TOKEN_INDEX)


def test_a_prefix_with_an_image_placeholder_is_refused(base_scorer):
    with pytest.raises(ValueError, match="must be text only: cut it before the image placeholder"):
        base_scorer.model.encode_prompt_prefix(torch.tensor([1, IMAGE_TOKEN_INDEX, 450]))
