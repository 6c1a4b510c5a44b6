"""Diffusion-model rewards from the ArtQuant scorer, any preset (ArtQuant, DeQA-Score, OneAlign, Q-ReAlign on its
0..1 scale): the reward functions (ddpo-pytorch contract and differentiable), the RL-trainer adapters, best-of-N
sampling, reward guidance during sampling, and DRaFT-K LoRA fine-tuning.

The only part of artquant that touches diffusers; `reward.functions` and `reward.trainers` themselves need only torch.
"""

from .best_of_n import (
    Candidate,
    best_of_n,
    best_of_n_to_folder,
    contact_sheet,
)
from .functions import ArtQuantReward, RunningMoments, artquant_reward
from .guidance import RewardGuidance
from .trainers import (
    FlowFactoryReward,
    RewardOutput,
    alignprop_reward,
    async_reward,
    flow_grpo_reward,
    flow_grpo_score,
)

__all__ = [
    "ArtQuantReward",
    "Candidate",
    "FlowFactoryReward",
    "RewardGuidance",
    "RewardOutput",
    "RunningMoments",
    "alignprop_reward",
    "artquant_reward",
    "async_reward",
    "best_of_n",
    "best_of_n_to_folder",
    "contact_sheet",
    "flow_grpo_reward",
    "flow_grpo_score",
]
