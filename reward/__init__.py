"""Diffusion-model rewards from the ArtQuant scorer: the reward functions (ddpo-pytorch contract and differentiable),
best-of-N sampling, reward guidance during sampling, and DRaFT-K LoRA fine-tuning.

The only part of artquant that touches diffusers; `reward.functions` itself needs only torch.
"""

from .best_of_n import (
    Candidate,
    best_of_n,
    best_of_n_to_folder,
    contact_sheet,
)
from .functions import ArtQuantReward, RunningMoments, artquant_reward
from .guidance import RewardGuidance

__all__ = [
    "ArtQuantReward",
    "Candidate",
    "RewardGuidance",
    "RunningMoments",
    "artquant_reward",
    "best_of_n",
    "best_of_n_to_folder",
    "contact_sheet",
]
