"""Golden Q-ReAlign outputs from the authors' own inference code, on the tiny checkpoint in tests/data/qrealign_tiny.

Run once, in a separate environment that has the authors' code installed (never a dependency of this project):

    python -m venv golden && golden/bin/pip install torch torchvision "transformers>=5.2" pyiqa==0.1.16
    golden/bin/python tests/data/make_qrealign_golden.py

It scores tests/data/qrealign_images/*.png with pyiqa's `QReAlign` metric (the scorer the Q-ReAlign README points
to: Qwen3VLProcessor with its torchvision image processor, chat template + answer stem, one image at a time), and
records what transformers' own processor makes of each image (input ids, patch grid, patch statistics), so that the
tests can check this project's prompt and preprocessing apart from the scores. Only numbers are kept.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).parent
MODEL = HERE / "qrealign_tiny"
IMAGES = HERE / "qrealign_images"
TASKS = {"quality": "quality", "aesthetics": "aesthetic"}  # our preset's task -> pyiqa's task name
# (name, width, height): small and large (downscaled to the pixel budget), tall, wide, tiny (upscaled), square.
SIZES = [("wide", 100, 60), ("tall", 40, 300), ("square", 77, 77), ("large", 300, 220), ("thin", 9, 900),
         ("odd", 257, 129)]


def make_images() -> list[Path]:
    """Deterministic test pictures: smooth gradients with noise, different per image."""
    IMAGES.mkdir(exist_ok=True)
    paths = []
    for index, (name, width, height) in enumerate(SIZES):
        rng = np.random.default_rng(index)
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x / max(1, width - 1), y / max(1, height - 1), (x + y) / max(1, width + height - 2)], -1)
        pixels = np.clip(base * rng.uniform(80, 255, 3) + rng.normal(0, 12, (height, width, 3)), 0, 255)
        path = IMAGES / f"{name}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def main() -> None:
    import pyiqa
    import torchvision
    import transformers
    from pyiqa.archs.qrealign_arch import QReAlign
    from transformers import AutoProcessor

    torch.set_num_threads(1)
    paths = make_images()
    golden = {
        "made_with": {"pyiqa": pyiqa.__version__, "transformers": transformers.__version__,
                      "torch": torch.__version__, "torchvision": torchvision.__version__,
                      "machine": platform.machine()},
        "dtype": "float32",
        "scores": {},
        "processor": {},
    }
    for task, pyiqa_task in TASKS.items():
        metric = QReAlign(model=str(MODEL), dtype=torch.float32, task=pyiqa_task)
        scores = {}
        for path in paths:
            pixels = np.asarray(Image.open(path).convert("RGB"))
            images = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255  # exact: k/255*255 == k in fp32
            scores[path.name] = float(metric(images).item())
        golden["scores"][task] = scores

    processor = AutoProcessor.from_pretrained(MODEL)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Can you rate the quality of this picture?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True) + "The quality of the image is"
    for path in paths:
        inputs = processor(text=[text], images=[Image.open(path).convert("RGB")], return_tensors="pt")
        patches = inputs["pixel_values"].double()
        golden["processor"][path.name] = {
            "input_ids": inputs["input_ids"][0].tolist(),
            "mm_token_type_ids": inputs["mm_token_type_ids"][0].tolist(),
            "image_grid_thw": inputs["image_grid_thw"][0].tolist(),
            "patches_shape": list(patches.shape),
            "patches_sum": float(patches.sum()),
            "patches_abs_sum": float(patches.abs().sum()),
            "patches_weighted_sum": float((patches * torch.linspace(-1, 1, patches.numel()).view_as(patches).double()).sum()),
            "patches_head": patches.flatten()[:16].tolist(),
        }
    (HERE / "qrealign_golden.json").write_text(json.dumps(golden) + "\n")


if __name__ == "__main__":
    main()
