"""Checkpoint loading: the formats that exist (broken ones: test_checkpoint_bad_inputs.py)."""

import shutil

import pytest
import torch

from artquant import ArtQuantScorer, CheckpointError
from artquant.scorer import MplugOwl2Config, PRESETS, get_preset
from artquant.scorer.checkpoint import _non_lora_state_dict, find_file


def _copy(reference_dir, tmp_path, name):
    target = tmp_path / name
    shutil.copytree(reference_dir / name, target)
    return target


def test_sharded_safetensors_checkpoint_loads(base_scorer, reference_images, tmp_path):
    base_scorer.model.save_pretrained(tmp_path / "sharded", max_shard_size="1MB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    shutil.copy(base_scorer.tokenizer.model_file, tmp_path / "sharded" / "tokenizer.model")
    # No preprocessor_config.json: the defaults follow the vision config's image size.
    scorer = ArtQuantScorer.from_pretrained(tmp_path / "sharded", device="cpu", dtype="fp32")
    assert scorer.image_config.resize_to == 56
    assert scorer.score(reference_images[:2])[0].score == pytest.approx(base_scorer.score(reference_images[:1])[0].score, abs=1e-6)


def test_auto_classes_know_mplug_owl2(reference_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(reference_dir / "mplug_owl2_base")
    assert isinstance(config, MplugOwl2Config)
    model = AutoModelForCausalLM.from_config(config)
    assert "model.layers.0.self_attn.v_proj.multiway.1.weight" in model.state_dict()


def test_lora_release_needs_a_reachable_base(reference_dir, tmp_path):
    release = _copy(reference_dir, tmp_path, "artquant_lora")  # its recorded base, ../mplug_owl2_base, is gone
    with pytest.raises(CheckpointError, match="MAGAer13/mplug-owl2-llama2-7b"):
        ArtQuantScorer.from_pretrained(release, device="cpu", base=None)
    scorer = ArtQuantScorer.from_pretrained(release, base=reference_dir / "mplug_owl2_base", device="cpu")
    assert scorer.source.endswith("mplug_owl2_base")


def test_full_checkpoint_rejects_a_base(reference_dir):
    with pytest.raises(CheckpointError, match="do not pass a base"):
        ArtQuantScorer.from_pretrained(reference_dir / "mplug_owl2_base", base=reference_dir / "mplug_owl2_base")


def test_offline_hub_id_names_what_to_download(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"hf download Liuuuu123/ArtQuant"):
        find_file("Liuuuu123/ArtQuant", "adapter_config.json")


def test_nonsense_location(tmp_path):
    with pytest.raises(CheckpointError, match="neither a checkpoint folder nor a Hugging Face id"):
        find_file(str(tmp_path / "does" / "not" / "exist"), "config.json")


def test_non_lora_key_rules_of_the_reference():
    raw = {"base_model.model.model.vision_model.x": 1, "base_model.model.lm_head.weight": 2}
    assert _non_lora_state_dict(raw) == {"model.vision_model.x": 1, "lm_head.weight": 2}
    assert _non_lora_state_dict({"model.visual_abstractor.y": 3}) == {"model.visual_abstractor.y": 3}


def test_presets_are_complete():
    for preset in PRESETS.values():
        # mPLUG-Owl2 presets carry their template; Qwen-VL ones use the checkpoint's chat template.
        assert ("<|image|>" in preset.prompt()) == (preset.family == "mplug_owl2")
        assert len(preset.level_names) == len(preset.level_weights) == 5
        low, high = preset.score_range
        assert min(preset.level_weights) == low and max(preset.level_weights) == high
    assert get_preset("artquant").prompt() == (
        "USER: How would you rate the quality of this painting?\n<|image|> ASSISTANT: The quality of the painting is"
    )
    with pytest.raises(ValueError, match="deqa-score"):
        get_preset("nope")


def test_other_presets_score_with_their_own_prompt(reference_dir, reference_images):
    scorer = ArtQuantScorer.from_pretrained(reference_dir / "mplug_owl2_base", preset="deqa-score", device="cpu")
    assert "\nASSISTANT: The quality of the image is" in scorer.tokenizer.decode(scorer.prompt_ids)
    result = scorer.score(reference_images[:1])[0]
    assert 1.0 <= result.score <= 5.0


def test_quantization_needs_bitsandbytes_and_a_gpu(reference_dir):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available():
        pytest.skip("this machine can quantise; the error path is for machines that cannot")
    with pytest.raises(CheckpointError, match="bitsandbytes"):
        ArtQuantScorer.from_pretrained(reference_dir / "mplug_owl2_base", quantization="8bit")
    with pytest.raises(ValueError, match="'8bit' or '4bit'"):
        ArtQuantScorer.from_pretrained(reference_dir / "mplug_owl2_base", quantization="3bit")


def test_loading_a_lora_release_shows_no_deprecation_of_peft_s_making(reference_dir, recwarn):
    """peft reads transformers 5's deprecated `is_gradient_checkpointing`: a FutureWarning on every `artquant score`
    of the default (LoRA) release that the user can do nothing about."""
    import warnings

    warnings.simplefilter("always")
    ArtQuantScorer.from_pretrained(reference_dir / "artquant_lora", device="cpu", dtype="fp32")
    assert not [w for w in recwarn if "is_gradient_checkpointing" in str(w.message)]
