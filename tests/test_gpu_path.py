"""The GPU path's options, checked on the CPU: SDPA, bf16 throughout, `compile`, and the automatic batch size."""

import numpy as np
import pytest
import torch

from artquant import ArtQuantScorer
from artquant.scorer.scoring import CPU_BATCH_SIZE, fitting_batch_size


def test_language_model_and_vision_tower_use_sdpa(base_scorer, monkeypatch):
    assert base_scorer.model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        base_scorer.level_logits(torch.zeros(1, 3, 56, 56))  # the prompt prefix's pass, now cached
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        base_scorer.level_logits(torch.zeros(1, 3, 56, 56))
    config = base_scorer.model.config
    layers = config.vision_config.num_hidden_layers + config.abstractor_config.num_hidden_layers + config.num_hidden_layers
    assert len(calls) == layers, "every attention layer (ViT, abstractor, LLM) goes through SDPA"


def test_bf16_scorer_computes_in_bf16_and_agrees_with_fp32(reference_dir, base_scorer, reference_images):
    scorer = ArtQuantScorer.from_pretrained(reference_dir / "mplug_owl2_base", device="cpu", dtype="bf16")
    assert {p.dtype for p in scorer.model.parameters()} == {torch.bfloat16}
    dtypes = []
    hook = scorer.model.model.layers[0].register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    bf16 = [r.score for r in scorer.score(reference_images)]
    hook.remove()
    assert set(dtypes) == {torch.bfloat16}
    fp32 = [r.score for r in base_scorer.score(reference_images)]
    # bf16 keeps 8 bits of mantissa: scores of 1..10 move by a few hundredths on this random model.
    np.testing.assert_allclose(bf16, fp32, atol=0.1)


def test_compiled_scorer_keeps_golden_parity_and_weight_names(reference_dir, reference_images, golden):
    """`compile=` takes torch.compile's arguments; the eager backend checks the tracing in seconds (the default
    inductor backend builds kernels for minutes, a GPU benchmark's job)."""
    scorer = ArtQuantScorer.from_pretrained(
        reference_dir / "mplug_owl2_base", device="cpu", dtype="fp32", compile={"backend": "eager"}
    )
    layer = scorer.model.model.layers[0]
    assert layer._compiled_call_impl is not None and scorer.model.model.vision_model._compiled_call_impl is not None
    assert all("_orig_mod" not in name for name in scorer.model.state_dict())
    scores = [r.score for r in scorer.score(reference_images, batch_size=6)]
    np.testing.assert_allclose(scores, golden["base_scores"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("fits, limit, expected", [(1, 256, 1), (37, 256, 37), (200, 256, 200), (256, 256, 256),
                                                   (1000, 256, 256), (5, 4, 4)])
def test_fitting_batch_size_finds_the_largest_batch_that_fits(fits, limit, expected):
    tried = []

    def run(batch):
        tried.append(batch)
        if batch > fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory at batch {batch}")

    assert fitting_batch_size(run, limit) == expected
    assert max(tried) <= limit and len(tried) <= 2 * limit.bit_length()


def test_fitting_batch_size_when_nothing_fits():
    def run(batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="Not even one image fits into the device's memory: load the scorer in bf16"):
        fitting_batch_size(run, 64)


def test_largest_batch_size_on_the_cpu_is_fixed_without_probing(base_scorer):
    calls = []
    hook = base_scorer.model.model.layers[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    assert base_scorer.largest_batch_size() == CPU_BATCH_SIZE
    hook.remove()
    assert not calls


def test_out_of_memory_scores_in_halves_and_never_raises(base_scorer, reference_images, monkeypatch):
    """A batch that runs out of device memory is split until it fits; images that fit nowhere become errors."""
    expected = [r.score for r in base_scorer.score(reference_images, batch_size=6)]
    level_logits = base_scorer.level_logits

    def device_of_two(pixel_values):
        if len(pixel_values) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return level_logits(pixel_values)

    monkeypatch.setattr(base_scorer, "level_logits", device_of_two)
    np.testing.assert_allclose([r.score for r in base_scorer.score(reference_images, batch_size=6)], expected,
                               atol=1e-5, rtol=0)

    def full_device(pixel_values):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(base_scorer, "level_logits", full_device)
    results = base_scorer.score(reference_images, batch_size=6)
    assert len(results) == len(reference_images)
    assert all(not r.ok and "does not fit into the cpu device's memory" in r.error for r in results)
