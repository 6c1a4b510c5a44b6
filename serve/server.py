"""The reward server: a Ray Serve application that scores PNG/JPEG/WebP images posted over HTTP.

Requests from many clients are batched per image by `@serve.batch`; replicas, routing, health checks and
back-pressure (503 once `max_queued_requests` wait) are Ray Serve's. Nothing is ever unpickled: images arrive as
multipart file parts, as base64 strings in JSON, or as one raw `image/*` body (see the README's HTTP API).
"""

# No `from __future__ import annotations`: FastAPI reads the `Request` annotations of the routes at run time.
import asyncio
import base64
import binascii
import hmac
import io
import json
import os
from dataclasses import asdict, dataclass

from fastapi import FastAPI, HTTPException, Request
from PIL import Image
from ray import serve
from ray.serve.metrics import Histogram

from ..scorer import ArtQuantScorer
from ..scorer.images import rgb_from_pil
from .cluster import start_ray

TOKEN_ENV = "ARTQUANT_SERVE_TOKEN"
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class RequestLimits:
    """What one request may carry; anything beyond gets a 413 that names the limit."""

    max_images: int = 64
    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 4096 * 4096


def version() -> str:
    from .. import __version__

    return __version__


def _reject(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def decode_image(data: bytes, index: int, limits: RequestLimits):
    """Encoded bytes -> uint8 [3, H, W], or an HTTP error that says which image and why."""
    if not data:
        raise _reject(400, f"image {index} is empty (0 bytes).")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as error:
        raise _reject(413, f"image {index} is too large: {error}") from None
    except Exception:  # PIL raises several types for bytes it does not recognise
        raise _reject(400, f"image {index} is not a PNG, JPEG or WebP image.") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise _reject(413, f"image {index} has {width}x{height} pixels; this server accepts at most {limits.max_pixels}.")
    try:
        image.load()
    except Exception as error:
        raise _reject(400, f"image {index} is damaged or truncated ({error}).") from None
    return rgb_from_pil(image)


async def read_encoded_images(request: Request, limits: RequestLimits) -> list[bytes]:
    """The encoded images of a request: multipart file parts, JSON {"images": [base64, ...]}, or one image/* body."""
    length = request.headers.get("content-length")
    if length is None:
        raise _reject(411, "send a Content-Length header (chunked uploads are not accepted).")
    if not length.isdigit() or int(length) > limits.max_bytes:
        raise _reject(413, f"the request has {length} bytes; this server accepts at most {limits.max_bytes}.")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form(max_files=limits.max_images + 1, max_fields=limits.max_images + 1)
        images = [await part.read() for _, part in form.multi_items() if not isinstance(part, str)]
    elif content_type == "application/json":
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise _reject(400, f"the body is not valid JSON ({error}).") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
            raise _reject(400, 'expected a JSON object {"images": ["<base64 PNG/JPEG>", ...]}.')
        images = []
        for index, text in enumerate(payload["images"]):
            try:
                images.append(base64.b64decode(text, validate=True))
            except (binascii.Error, TypeError, ValueError):
                raise _reject(400, f"images[{index}] is not a base64 string.") from None
    elif content_type.startswith("image/"):
        images = [await request.body()]
    else:
        raise _reject(415, "send multipart/form-data file parts, application/json {\"images\": [base64, ...]} or one image/* body.")
    if not images:
        raise _reject(400, "the request holds no image.")
    if len(images) > limits.max_images:
        raise _reject(413, f"the request holds {len(images)} images; this server accepts at most {limits.max_images}.")
    return images


api = FastAPI(title="ArtQuant reward server")


@serve.deployment(name="ArtQuantReward", health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(api)
class RewardServer:
    """One replica: the scorer, loaded once, behind a batching queue."""

    def __init__(self, scorer_options: dict, limits: dict, token: str | None, max_batch_size: int, batch_wait_timeout_s: float):
        self.scorer = ArtQuantScorer.from_pretrained(**scorer_options)
        self.limits = RequestLimits(**limits)
        self.token = token
        self.score_images.set_max_batch_size(max_batch_size)
        self.score_images.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batching = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s}
        self.batches, self.largest_batch = 0, 0
        self.batch_size_metric = Histogram(
            "artquant_batch_size", description="Images per model call.", boundaries=[1, 2, 4, 8, 16, 32, 64, 128]
        )

    def check_health(self) -> None:  # called by Ray Serve; raising marks the replica unhealthy and replaces it
        if self.scorer is None:
            raise RuntimeError("the scorer is not loaded")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def score_images(self, images: list) -> list[tuple]:
        # The model runs in a thread so the replica keeps answering health checks and parsing requests meanwhile.
        results = await asyncio.to_thread(self.scorer.score, images, batch_size=len(images))
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(images))
        self.batch_size_metric.observe(len(images))
        return [(result, len(images)) for result in results]

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer "):
            raise _reject(401, "this server requires 'Authorization: Bearer <token>'.")
        if not hmac.compare_digest(given[len("Bearer "):].encode(), self.token.encode()):
            raise _reject(401, "the bearer token is wrong.")

    @api.get("/health")
    def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/info")
    def info(self, request: Request) -> dict:
        self._authorize(request)
        preset = self.scorer.preset
        return {
            "model": str(self.scorer.source),
            "preset": preset.name,
            "level_names": list(preset.level_names),
            "level_weights": list(preset.level_weights),
            "score_range": list(preset.score_range),
            "version": version(),
            "device": str(self.scorer.device),
            "dtype": str(self.scorer.dtype).removeprefix("torch."),
            "limits": asdict(self.limits),
            "batching": self.batching,
            "replica": {"batches": self.batches, "largest_batch": self.largest_batch},
        }

    @api.post("/score")
    async def score(self, request: Request) -> dict:
        self._authorize(request)
        encoded = await read_encoded_images(request, self.limits)
        images = [decode_image(data, index, self.limits) for index, data in enumerate(encoded)]
        scored = await asyncio.gather(*(self.score_images(image) for image in images))
        failed = [f"image {i}: {result.error}" for i, (result, _) in enumerate(scored) if not result.ok]
        if failed:
            raise _reject(400, "; ".join(failed))
        return {
            "scores": [result.score for result, _ in scored],
            "stds": [result.std for result, _ in scored],
            "level_names": list(self.scorer.preset.level_names),
            "level_probs": [list(result.level_probs.values()) for result, _ in scored],
            "batch_sizes": [size for _, size in scored],
        }


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS


def build_app(args: dict, deployment_options: dict | None = None):
    """The Ray Serve application; `import_path: artquant.serve.server:build_app` in a `serve deploy` config.

    args: model, base, preset, dtype, device (as `ArtQuantScorer.from_pretrained`); max_batch_size,
    batch_wait_timeout_s; max_images, max_bytes, max_pixels; token (default: $ARTQUANT_SERVE_TOKEN);
    require_token (default true: a server reachable beyond loopback must not run without one).
    `deployment_options`: Ray Serve deployment options (num_replicas, ray_actor_options, max_queued_requests, ...);
    a `serve deploy` config sets them in its `deployments:` section instead.
    """
    args = dict(args)
    unknown = set(args) - {
        "model", "base", "preset", "dtype", "device", "max_batch_size", "batch_wait_timeout_s",
        "max_images", "max_bytes", "max_pixels", "token", "require_token",
    }
    if unknown:
        raise ValueError(f"unknown artquant serve argument(s): {', '.join(sorted(unknown))}")
    token = args.get("token") or os.environ.get(TOKEN_ENV) or None
    if token is None and args.get("require_token", True):
        raise ValueError(f"set a bearer token ({TOKEN_ENV} or args.token): a server off loopback must require one.")
    scorer_options = {key: args.get(key) for key in ("model", "base", "device")}
    scorer_options.update(preset=args.get("preset", "artquant"), dtype=args.get("dtype", "auto"))
    limits = {key: int(args[key]) for key in ("max_images", "max_bytes", "max_pixels") if args.get(key) is not None}
    return RewardServer.options(**(deployment_options or {})).bind(
        scorer_options,
        limits,
        token,
        int(args.get("max_batch_size", 16)),
        float(args.get("batch_wait_timeout_s", 0.01)),
    )


def run_server(
    app_args: dict,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int | None = None,
    cpus_per_replica: float = 1,
    gpus_per_replica: float = 1,
    max_ongoing_requests: int = 32,
    max_queued_requests: int = 128,
) -> None:
    """Starts Ray (or joins RAY_ADDRESS), deploys the server and blocks until SIGINT/SIGTERM, then shuts down.

    `replicas`: default one per GPU (each holding `gpus_per_replica`, 1: one GPU each), or one CPU replica when
    there is no GPU.
    """
    import signal
    import threading

    import ray

    if not is_loopback(host) and not (app_args.get("token") or os.environ.get(TOKEN_ENV)):
        raise ValueError(f"--host {host} is reachable beyond this machine: set {TOKEN_ENV} to a secret bearer token.")
    start_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actor_options = {"num_gpus": gpus_per_replica} if gpus else {"num_cpus": cpus_per_replica}
    options = {
        "num_replicas": replicas or max(int(gpus / gpus_per_replica), 1),
        "ray_actor_options": actor_options,
        "max_ongoing_requests": max_ongoing_requests,
        "max_queued_requests": max_queued_requests,
    }
    application = build_app({**app_args, "require_token": not is_loopback(host)}, options)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application, name="artquant", route_prefix="/")
    print(f"artquant serve: listening on http://{host}:{port} (POST /score, GET /health, GET /info)", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
