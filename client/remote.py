"""`RemoteReward`: ArtQuant scores from an `artquant serve` server, for RL trainers in their own environments.

Standard library HTTP, numpy and Pillow only: it installs beside any torch/transformers/diffusers pins.
"""

from __future__ import annotations

import io
import json
import random
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

RETRIED_STATUSES = (408, 429, 500, 502, 503, 504)  # overload, a replica being replaced, a proxy in between


class RemoteRewardError(RuntimeError):
    """The server refused a request (4xx: the message says why) or stayed unreachable through every retry."""


def images_to_uint8(images: Any) -> list[np.ndarray]:
    """Images as uint8 HWC arrays, from what trainers hold: a torch or numpy batch ([B,C,H,W] or [B,H,W,C],
    float in [0, 1] or uint8) or a list of PIL images / arrays. Float images are rounded as ddpo-pytorch does."""
    if hasattr(images, "detach"):  # a torch tensor, without importing torch
        images = images.detach().float().cpu().numpy() if images.is_floating_point() else images.detach().cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise ValueError(f"expected a batch [B, C, H, W] or [B, H, W, C], got shape {images.shape}.")
        if images.shape[1] in (1, 3, 4) and images.shape[-1] not in (1, 3, 4):
            images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC
        images = list(images)
    arrays = []
    for index, image in enumerate(images):
        array = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating):
                raise ValueError(f"image {index}: use uint8 or float in [0, 1], not {array.dtype}.")
            array = (array * 255).round().clip(0, 255).astype(np.uint8)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        arrays.append(array)
    return arrays


def encode_image(array: np.ndarray, image_format: str = "PNG", quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    options = {"quality": quality} if image_format.upper() == "JPEG" else {}
    Image.fromarray(array).save(buffer, format=image_format, **options)
    return buffer.getvalue()


class RemoteReward:
    """Scores images on an ArtQuant server.

    >>> reward = RemoteReward("http://127.0.0.1:8000")
    >>> rewards, info = reward(images, prompts, metadata)                        # ddpo-pytorch reward contract
    >>> reward_fn = reward.multi_score({"artquant": 1.0})                        # flow_grpo / DiffusionNFT contract
    >>> score_details, _ = reward_fn(images, prompts, metadata, only_strict=True)

    `token`: the server's bearer token. `image_format`: PNG (lossless: scores equal local scoring) or JPEG.
    Requests of `batch_size` images go out `concurrency` at a time (the server batches them across clients);
    each gets `timeout` seconds and up to `retries` retries on connection errors, time-outs and 408/429/5xx,
    waiting `backoff * 2**attempt` seconds (with jitter, at most `max_backoff`, or the server's Retry-After).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 120.0,
        retries: int = 6,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        batch_size: int = 64,
        concurrency: int = 4,
        image_format: str = "PNG",
    ):
        if batch_size < 1 or concurrency < 1 or retries < 0:
            raise ValueError("batch_size and concurrency must be at least 1, retries at least 0.")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.batch_size, self.concurrency, self.image_format = batch_size, concurrency, image_format

    # ------------------------------------------------------------------------------------------------------------
    def _request(self, path: str, body: bytes | None = None, content_type: str | None = None) -> dict:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url + path, data=body, headers=headers, method="POST" if body else "GET")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                detail = _detail(error)
                if error.code not in RETRIED_STATUSES or attempt == self.retries:
                    raise RemoteRewardError(f"{self.url}{path}: HTTP {error.code}: {detail}") from None
                wait = min(self.max_backoff, _retry_after(error) or self._wait(attempt))
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
                if attempt == self.retries:
                    raise RemoteRewardError(f"{self.url}{path}: unreachable after {attempt + 1} tries ({error}).") from None
                wait = self._wait(attempt)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _wait(self, attempt: int) -> float:
        return min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)

    def health(self) -> dict:
        return self._request("/health")

    def info(self) -> dict:
        """Model, preset, level names and weights, score range, version and the server's limits."""
        return self._request("/info")

    def score_encoded(self, encoded: Sequence[bytes]) -> dict:
        """One request: already encoded PNG/JPEG/WebP images -> the server's JSON (scores, stds, level_probs)."""
        boundary = uuid.uuid4().hex
        parts = []
        for index, data in enumerate(encoded):
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{index}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
            )
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self._request("/score", body, f"multipart/form-data; boundary={boundary}")

    def score(self, images: Any) -> dict[str, np.ndarray]:
        """scores [N], stds [N], level_probs [N, L] (float64) and level_names for a batch or list of images."""
        arrays = images_to_uint8(images)
        if not arrays:
            return {"scores": np.zeros(0), "stds": np.zeros(0), "level_probs": np.zeros((0, 0)), "level_names": []}
        chunks = [arrays[i : i + self.batch_size] for i in range(0, len(arrays), self.batch_size)]

        def send(chunk: list[np.ndarray]) -> dict:
            return self.score_encoded([encode_image(a, self.image_format) for a in chunk])

        with ThreadPoolExecutor(min(self.concurrency, len(chunks))) as pool:
            answers = list(pool.map(send, chunks))
        return {
            "scores": np.array([s for a in answers for s in a["scores"]], dtype=np.float64),
            "stds": np.array([s for a in answers for s in a["stds"]], dtype=np.float64),
            "level_probs": np.array([p for a in answers for p in a["level_probs"]], dtype=np.float64),
            "level_names": answers[0]["level_names"],
        }

    # ------------------------------------------------------------------------------------------------------------
    def __call__(self, images: Any, prompts: Any = None, metadata: Any = None) -> tuple[np.ndarray, dict]:
        """The ddpo-pytorch reward contract: `(rewards [B], info)`; info holds the stds and level probabilities."""
        result = self.score(images)
        return result["scores"], {"std": result["stds"], "level_probs": result["level_probs"]}

    def multi_score(self, score_dict: dict[str, float]) -> Callable:
        """flow_grpo's `multi_score(device, score_dict)` for this server: `fn(images, prompts, metadata,
        only_strict=True) -> ({name: scores, "avg": weighted sum}, {})`. Only the key "artquant" is served here;
        `only_strict` is accepted and ignored (it concerns GenEval)."""
        unknown = set(score_dict) - {"artquant"}
        if unknown:
            raise ValueError(f"this server provides the score 'artquant', not {sorted(unknown)}.")

        def score_fn(images, prompts, metadata, only_strict: bool = True):
            scores = self(images, prompts, metadata)[0]
            details = {"artquant": scores.tolist(), "avg": (score_dict["artquant"] * scores).tolist()}
            return details, {}

        return score_fn


def _detail(error: urllib.error.HTTPError) -> str:
    try:
        body = error.read()
        return str(json.loads(body).get("detail", body.decode(errors="replace")))
    except Exception:
        return error.reason or "no message"


def _retry_after(error: urllib.error.HTTPError) -> float | None:
    value = error.headers.get("Retry-After") if error.headers else None
    return float(value) if value and value.replace(".", "", 1).isdigit() else None
