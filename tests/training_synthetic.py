"""A tiny random-init mPLUG-Owl2 and a synthetic rating task (photos degraded by noise, rated by the noise level)
for the training tests. Not a test module itself."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE_PHOTOS = ("astronaut", "camera", "coffee", "rocket", "chelsea", "moon", "page", "clock", "coins", "brick",
                  "grass", "gravel", "immunohistochemistry", "hubble_deep_field", "colorwheel", "cell")


def build_tiny_model(reference_dir: Path, out: Path, seed: int = 0, initializer_range: float = 0.1) -> Path:
    """A random mPLUG-Owl2 at 56 px (the fixture's shape) with the fixture's tokenizer, saved as a checkpoint.

    At the usual 0.02 init the random abstractor lets almost nothing of the image through (its outputs differ by
    ~0.1% between images), so a few hundred CPU steps cannot learn; 0.1 keeps the image visible."""
    import torch

    from artquant.scorer import MPLUGOwl2LlamaForCausalLM, MplugOwl2Config

    torch.manual_seed(seed)
    config = MplugOwl2Config.from_pretrained(str(reference_dir / "mplug_owl2_base"))
    config.initializer_range = initializer_range
    MPLUGOwl2LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.model", "preprocessor_config.json"):
        shutil.copyfile(reference_dir / "mplug_owl2_base" / name, out / name)
    return out


def source_photos(reference_dir: Path, size: int = 96) -> list[np.ndarray]:
    """The fixture's photos plus scikit-image's bundled ones (when installed), as RGB uint8 squares."""
    photos = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC))
              for p in sorted((reference_dir / "images").glob("*.png")) if "rgba" not in p.name]
    try:
        import skimage.data
    except ImportError:
        return photos
    for name in SKIMAGE_PHOTOS:
        try:
            array = np.asarray(getattr(skimage.data, name)())
        except Exception:  # a data file that needs a download (no internet in CI)
            continue
        image = Image.fromarray(array if array.ndim == 3 else np.stack([array] * 3, -1)).convert("RGB")
        photos.append(np.asarray(image.resize((size, size), Image.BICUBIC)))
    return photos


def degrade(photo: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Haze: the photo faded towards flat grey by `strength` (0..1), plus a little sensor noise."""
    faded = (1 - 0.9 * strength) * photo.astype(np.float64) + 0.9 * strength * 128.0
    return (faded + rng.normal(0, 3, photo.shape)).clip(0, 255).astype(np.uint8)


def rating(strength: float) -> float:
    return 9.0 - 7.5 * strength


def description(strength: float) -> str:
    amount = "no" if strength < 0.15 else "a light" if strength < 0.45 else "a strong" if strength < 0.75 else "a heavy"
    return (f"Perception: the photo has {amount} grey haze. Cognition: the haze flattens contrast and colour. "
            f"Emotion: it feels {'vivid' if strength < 0.45 else 'dull'}.")


def write_task(root: Path, photos: list[np.ndarray], per_photo: int, seed: int) -> dict[str, Path]:
    """Degraded copies of each photo under root/images, a scores CSV, a RAD-style description JSON, and a
    held-out score JSON (other strengths). Returns their paths."""
    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows, descriptions, held_out = [], [], []
    for index, photo in enumerate(photos):
        for copy in range(per_photo + 2):
            strength = float(rng.uniform(0, 1))
            name = f"p{index:02d}_{copy}.png"
            Image.fromarray(degrade(photo, strength, rng)).save(images / name)
            if copy >= per_photo:
                held_out.append({"image": name, "gt_score": rating(strength)})
                continue
            rows.append({"image": name, "score": f"{rating(strength):.3f}"})
            descriptions.append({
                "id": name, "image": name, "task_type": "description",
                "conversations": [
                    {"from": "human", "value": "Give a comprehensive analysis of the aesthetics of this painting.\n<|image|>"},
                    {"from": "gpt", "value": description(strength)},
                ],
            })
    with (root / "scores.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["image", "score"])
        writer.writeheader()
        writer.writerows(rows)
    (root / "descriptions.json").write_text(json.dumps(descriptions))
    (root / "held_out.json").write_text(json.dumps([
        {"image": r["image"], "gt_score": r["gt_score"], "conversations": [
            {"from": "human", "value": "How would you rate the quality of this painting?\n<|image|>"},
            {"from": "gpt", "value": "The quality of the painting is fair."}]}
        for r in held_out
    ]))
    return {"scores": root / "scores.csv", "descriptions": root / "descriptions.json", "held_out": root / "held_out.json",
            "images": images}
