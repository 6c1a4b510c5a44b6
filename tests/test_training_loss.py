"""The training loss and the training conversations against the reference fixture's golden values."""

from __future__ import annotations

import pytest
import torch

from artquant.scorer import load_images, pixel_values_from_images
from artquant.training.data import ANSWER_PREFIX, pad_batch, tokenize_conversation
from artquant.training.loss import ArtQuantLoss, LossWeights, find_level_positions


@pytest.fixture(scope="module")
def golden_samples(golden, golden_tensors, reference_images, base_scorer):
    """The three golden training samples with their images preprocessed by the core."""
    images = load_images([str(p) for p in reference_images[:3]])
    samples = []
    for index in range(3):
        samples.append({
            "input_ids": golden_tensors[f"sample{index}.input_ids"],
            "labels": golden_tensors[f"sample{index}.labels"],
            "level_probs": golden_tensors[f"sample{index}.level_probs"],
            "pixel_values": pixel_values_from_images(images[index][None], base_scorer.image_config)[0],
        })
    return samples


def test_v1_conversations_tokenise_like_the_reference(golden, golden_tensors, base_scorer):
    for index, sample in enumerate(golden["training_samples"]):
        input_ids, labels = tokenize_conversation(base_scorer.tokenizer, sample["conversations"])
        assert input_ids == golden_tensors[f"sample{index}.input_ids"].tolist()
        assert labels == golden_tensors[f"sample{index}.labels"].tolist()


def test_loss_terms_match_the_reference(golden, golden_samples, base_scorer):
    tokenizer = base_scorer.tokenizer
    expected = golden["losses"]
    weights = LossWeights(expected["weight_desp"], expected["weight_next_token"], expected["weight_softkl"])
    loss = ArtQuantLoss(base_scorer.model, golden["level_token_ids"], tokenizer.encode(ANSWER_PREFIX), weights)
    with torch.no_grad():
        terms = loss(
            score=pad_batch(golden_samples[:2], tokenizer.unk_token_id),
            description=pad_batch(golden_samples[2:], tokenizer.unk_token_id),
        )
    for name in ("score_loss", "score_softkl", "score_ce_without_level", "description_loss"):
        assert float(terms[name]) == pytest.approx(expected[name], rel=1e-4), name
    assert float(terms["loss"]) == pytest.approx(expected["total_loss"], rel=1e-4)


def test_level_position_is_found_after_the_answer_prefix(base_scorer, golden_tensors, golden):
    labels = golden_tensors["sample1.labels"][None]
    prefix = torch.tensor(base_scorer.tokenizer.encode(ANSWER_PREFIX))
    position = int(find_level_positions(labels, prefix)[0])
    # The level word of this sample's own answer ("The quality of the painting is <level>.").
    level = golden["training_samples"][1]["conversations"][1]["value"].removeprefix(ANSWER_PREFIX).strip(" .")
    assert int(labels[0, position]) == golden["level_token_ids"][golden["level_names"].index(level)]
    assert labels[0, position - len(prefix):position].tolist() == prefix.tolist()
    with pytest.raises(ValueError, match="answer prefix"):
        find_level_positions(torch.full_like(labels, -100), prefix)
