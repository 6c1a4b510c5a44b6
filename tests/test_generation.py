"""describe(): generation with the KV cache equals generation without it."""

import torch


def test_kv_cache_path_equals_no_cache_path(base_scorer, reference_images):
    from artquant.scorer import load_images, pixel_values_from_images

    images = load_images(reference_images[:2])
    pixel_values = torch.cat([pixel_values_from_images(image[None], base_scorer.image_config) for image in images])
    prompt = torch.tensor(base_scorer.tokenizer.encode_with_images(base_scorer.preset.prompt(answer_prefix="")))
    with torch.no_grad():
        cached = base_scorer.generate_from_pixels(prompt, pixel_values, max_new_tokens=12, do_sample=False, use_cache=True)
    # No cache: run the full sequence again for every new token and take the arg-max.
    model = base_scorer.model
    spliced = model.embed_multimodal(prompt.expand(2, -1), pixel_values)
    embeds, modality = spliced["inputs_embeds"], spliced["modality_indicators"]
    tokens = []
    with torch.no_grad():
        for _ in range(cached.shape[1]):
            logits = model(inputs_embeds=embeds, modality_indicators=modality, use_cache=False).logits[:, -1]
            next_token = logits.argmax(-1)
            tokens.append(next_token)
            embeds = torch.cat([embeds, model.get_input_embeddings()(next_token)[:, None]], dim=1)
            modality = torch.cat([modality, torch.zeros_like(modality[:, :1])], dim=1)
    assert torch.equal(cached, torch.stack(tokens, 1))
    assert cached.shape == (2, 12), "random weights never emit </s> this early"


def test_describe_returns_text_per_image_and_flags_bad_ones(base_scorer, reference_images, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"garbage")
    texts = base_scorer.describe([reference_images[0], tmp_path / "broken.png"], max_new_tokens=5)
    assert len(texts) == 2
    assert texts[0] and not texts[0].startswith("[error")
    assert texts[1].startswith("[error:") and "broken.png" in texts[1]
    assert base_scorer.describe([reference_images[0]], max_new_tokens=5) == texts[:1], "greedy is deterministic"
