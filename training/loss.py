"""ArtQuant's training loss (the reference's single-mode `forward`, `softkl_loss` and `forward_single`).

    total = weight_desp * CE(description batch)
          + weight_next_token * [CE(score batch without the level token) + weight_softkl * KL(target || p_level)]

`p_level` is the softmax over the whole vocabulary at the position that predicts the level word; the target puts
the score's level probabilities on the five level-word ids and zero elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..scorer.modeling_mplug_owl2 import IGNORE_INDEX


@dataclass(frozen=True)
class LossWeights:
    description: float = 1.0  # weight_desp
    next_token: float = 0.05  # weight_next_token
    softkl: float = 1.0  # weight_softkl (relative to the score CE)


def find_level_positions(labels: torch.Tensor, prefix_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] labels -> [B] index of the token right after the first occurrence of `prefix_ids` [P]."""
    windows = labels.unfold(1, prefix_ids.numel(), 1)  # [B, T - P + 1, P]
    matches = (windows == prefix_ids.to(labels.device)).all(-1)
    if not bool(matches.any(1).all()):
        rows = (~matches.any(1)).nonzero().flatten().tolist()
        raise ValueError(f"score samples {rows} have no answer prefix in their labels; score answers must read "
                         "'The quality of the painting is <level>.'")
    return matches.int().argmax(1) + prefix_ids.numel()


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of position t predicting label t + 1 (`IGNORE_INDEX` skipped). logits [B, T, V]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def soft_level_kl(level_logits: torch.Tensor, level_probs: torch.Tensor, level_ids: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(level_logits)), batch mean. level_logits [B, V], level_probs [B, L], level_ids [L]."""
    target = torch.zeros_like(level_logits, dtype=torch.float32)
    target[:, level_ids] = level_probs.float()
    return F.kl_div(torch.log_softmax(level_logits.float(), -1), target, reduction="batchmean")


def score_losses(logits, labels, level_probs, level_ids, prefix_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE without the level token, soft-KL at the level position) of a score batch; all [B, T(, V)] expanded."""
    level_positions = find_level_positions(labels, prefix_ids)
    rows = torch.arange(labels.shape[0], device=labels.device)
    level_tokens = labels[rows, level_positions]
    if not bool(torch.isin(level_tokens, level_ids.to(labels.device)).all()):
        raise ValueError(f"the answer's level tokens {level_tokens.tolist()} are not level words {level_ids.tolist()}.")
    # Dropping the level token from labels and its predicting logit (the reference's del_elements) is the same as
    # ignoring that one label: every other logit keeps its target and the token count drops by one.
    without_level = labels.clone()
    without_level[rows, level_positions] = IGNORE_INDEX
    kl = soft_level_kl(logits[rows, level_positions - 1], level_probs, level_ids)
    return next_token_loss(logits, without_level), kl


class ArtQuantLoss(nn.Module):
    """Wraps the (LoRA) mPLUG-Owl2 so that one `forward` gives every loss term; this is what accelerate prepares.

    `forward(score=batch|None, description=batch|None)`: each batch holds `input_ids`, `labels`, `attention_mask`,
    `pixel_values` (and `level_probs` for score batches). Returns a dict of scalar tensors: `loss`,
    `description_loss`, `score_loss`, `score_ce_without_level`, `score_softkl` (absent terms are 0).
    """

    def __init__(self, network: nn.Module, level_ids, prefix_ids, weights: LossWeights = LossWeights()):
        super().__init__()
        self.network = network
        self.weights = weights
        self.register_buffer("level_ids", torch.as_tensor(level_ids, dtype=torch.long), persistent=False)
        self.register_buffer("prefix_ids", torch.as_tensor(prefix_ids, dtype=torch.long), persistent=False)

    def logits_and_labels(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        spliced = self.network.embed_multimodal(
            batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"]
        )
        output = self.network(
            inputs_embeds=spliced["inputs_embeds"],
            modality_indicators=spliced["modality_indicators"],
            attention_mask=spliced["attention_mask"],
            use_cache=False,
        )
        return output.logits, spliced["labels"]

    def forward(self, score: dict | None = None, description: dict | None = None) -> dict[str, torch.Tensor]:
        zero = self.level_ids.new_zeros((), dtype=torch.float32)
        terms = {"description_loss": zero, "score_ce_without_level": zero, "score_softkl": zero}
        if description is not None:
            logits, labels = self.logits_and_labels(description)
            terms["description_loss"] = next_token_loss(logits, labels)
        if score is not None:
            logits, labels = self.logits_and_labels(score)
            ce, kl = score_losses(logits, labels, score["level_probs"], self.level_ids, self.prefix_ids)
            terms["score_ce_without_level"], terms["score_softkl"] = ce, kl
        terms["score_loss"] = terms["score_ce_without_level"] + self.weights.softkl * terms["score_softkl"]
        terms["loss"] = self.weights.description * terms["description_loss"] + self.weights.next_token * terms["score_loss"]
        return terms
