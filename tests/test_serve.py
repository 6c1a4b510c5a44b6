"""`artquant serve` end to end: one server from the CLI (subprocess, loopback, a random port, a token)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve_helpers import command_line, descendants, free_port, ray_free_env, start_cli, stop, wait_for

pytest.importorskip("ray")

from artquant.client import RemoteReward, RemoteRewardError  # noqa: E402

TOKEN = "test-token-7f3a"
MAX_BYTES = 2_000_000
MAX_PIXELS = 1_000_000
TOLERANCE = 1e-4  # batches of other shapes than the golden run's


def _serving(arguments: list[str], log: Path) -> tuple[str, subprocess.Popen]:
    """`artquant serve ARGUMENTS` on a free loopback port with the test token, once it answers /health: (url, process).
    The caller stops the process."""
    port = free_port()
    process = start_cli(["serve", *arguments, "--port", str(port)], log, ray_free_env(ARTQUANT_SERVE_TOKEN=TOKEN))
    url = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, 240, "the server to answer /health", process, log)
    except BaseException:
        stop(process)
        raise
    return url, process


@pytest.fixture(scope="module")
def server(reference_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = [
        "--model", str(reference_dir / "mplug_owl2_base"), "--dtype", "fp32",
        "--max-batch-size", "16", "--batch-wait-timeout", "0.25", "--max-ongoing-requests", "8",
        "--max-queued-requests", "4", "--max-bytes", str(MAX_BYTES), "--max-pixels", str(MAX_PIXELS),
    ]
    url, process = _serving(args, log)
    try:
        yield {"url": url, "process": process, "log": log}
    finally:
        stop(process)


@pytest.fixture(scope="module")
def fixture_images(reference_images) -> list[Image.Image]:
    images = [Image.open(path) for path in reference_images]
    for image in images:
        image.load()  # decoded once here: PIL's lazy loading is not thread-safe
    return images


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _post(url: str, body: bytes, content_type: str, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/score", data=body, headers=headers), timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body)
        except json.JSONDecodeError:
            return error.code, {"detail": body.decode(errors="replace")}


def _multipart(parts: list[bytes]) -> tuple[bytes, str]:
    boundary = "testboundary1234"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n\r\n'.encode() + data + b"\r\n"
        for i, data in enumerate(parts)
    )
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _info(url: str) -> dict:
    return RemoteReward(url, token=TOKEN).info()


def test_concurrent_clients_get_golden_scores_in_batches_across_clients(server, fixture_images, golden):
    start = threading.Barrier(8)

    def client(k: int):
        start.wait()
        return RemoteReward(server["url"], token=TOKEN, retries=2).score(fixture_images[k % 3 : k % 3 + 4])

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(client, range(8)))
    for k, answer in enumerate(answers):
        expected = slice(k % 3, k % 3 + 4)
        np.testing.assert_allclose(answer["scores"], golden["base_scores"][expected], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(answer["level_probs"], golden["base_level_probs"][expected], atol=TOLERANCE, rtol=0)
        assert answer["level_names"] == golden["level_names"]
    # Each request held 4 images: a model call of more than 4 images joined several clients' requests.
    assert _info(server["url"])["replica"]["largest_batch"] > 4


def test_info_describes_the_model(server, reference_dir):
    info = _info(server["url"])
    assert info["preset"] == "artquant" and info["score_range"] == [1.0, 10.0]
    assert info["level_weights"] == [10.0, 7.5, 5.0, 3.5, 1.0]
    assert info["model"] == str(reference_dir / "mplug_owl2_base") and info["version"]
    assert info["limits"] == {"max_images": 64, "max_bytes": MAX_BYTES, "max_pixels": MAX_PIXELS}


def test_json_base64_and_raw_image_bodies_score_like_multipart(server, fixture_images, golden):
    encoded = [base64.b64encode(_png(image)).decode() for image in fixture_images[:2]]
    status, answer = _post(server["url"], json.dumps({"images": encoded}).encode(), "application/json")
    assert status == 200
    np.testing.assert_allclose(answer["scores"], golden["base_scores"][:2], atol=TOLERANCE, rtol=0)
    status, answer = _post(server["url"], _png(fixture_images[2]), "image/png")
    assert status == 200
    np.testing.assert_allclose(answer["scores"], golden["base_scores"][2:3], atol=TOLERANCE, rtol=0)


def _tiny_png(width: int = 4, height: int = 4) -> bytes:
    return _png(Image.new("RGB", (width, height), (120, 30, 200)))


BAD_REQUESTS = [
    # (name, body, content type, token) -> (status, message fragment)
    ("not an image", _multipart([b"hello, not an image"]), TOKEN, 400, "image 0 is not a PNG, JPEG or WebP image"),
    ("truncated png", _multipart([_tiny_png(64, 64)[:60]]), TOKEN, 400, "image 0 is damaged or truncated"),
    ("empty part", _multipart([b""]), TOKEN, 400, "image 0 is empty"),
    ("no image at all", _multipart([]), TOKEN, 400, "holds no image"),
    ("too many images", _multipart([_tiny_png()] * 65), TOKEN, 413, "holds 65 images; this server accepts at most 64"),
    ("too many bytes", (b"x" * (MAX_BYTES + 1), "image/png"), TOKEN, 413, f"accepts at most {MAX_BYTES}"),
    ("too many pixels", _multipart([_tiny_png(1001, 1000)]), TOKEN, 413, f"1001x1000 pixels; this server accepts at most {MAX_PIXELS}"),
    ("malformed json", (b'{"images": [', "application/json"), TOKEN, 400, "not valid JSON"),
    ("json without images", (b'{"pictures": []}', "application/json"), TOKEN, 400, 'expected a JSON object {"images"'),
    ("bad base64", (b'{"images": ["***"]}', "application/json"), TOKEN, 400, "images[0] is not a base64 string"),
    ("unsupported type", (b"hello", "text/plain"), TOKEN, 415, "send multipart/form-data"),
    ("missing token", _multipart([_tiny_png()]), None, 401, "requires 'Authorization: Bearer <token>'"),
    ("wrong token", _multipart([_tiny_png()]), "not-the-token", 401, "the bearer token is wrong"),
]


@pytest.mark.parametrize("name, request_body, token, status, fragment", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_4xx_with_a_message(server, name, request_body, token, status, fragment):
    body, content_type = request_body
    got, answer = _post(server["url"], body, content_type, token)
    assert (got, fragment in str(answer.get("detail"))) == (status, True), answer


def test_the_server_keeps_serving_after_bad_requests_and_refuses_without_token(server, golden, fixture_images):
    with pytest.raises(RemoteRewardError, match="HTTP 401"):
        RemoteReward(server["url"], retries=0).score(fixture_images[:1])
    answer = RemoteReward(server["url"], token=TOKEN).score(fixture_images[:1])
    np.testing.assert_allclose(answer["scores"], golden["base_scores"][:1], atol=TOLERANCE, rtol=0)


def test_overload_answers_503_not_an_endless_queue(server):
    # 8 requests in the replica plus 4 queued are accepted; the rest of 40 simultaneous ones are refused at once.
    body, content_type = _multipart([_tiny_png()])
    start = threading.Barrier(40)

    def send(_):
        start.wait()
        return _post(server["url"], body, content_type)[0]

    with ThreadPoolExecutor(40) as pool:
        statuses = list(pool.map(send, range(40)))
    assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and statuses.count(200) >= 8, statuses
    assert _post(server["url"], body, content_type)[0] == 200


def test_a_killed_replica_is_replaced_and_the_client_retry_completes(server, fixture_images, golden):
    replicas = [pid for pid in descendants(server["process"].pid) if "ServeReplica" in command_line(pid)]
    assert len(replicas) == 1, [command_line(pid) for pid in descendants(server["process"].pid)]
    reward = RemoteReward(server["url"], token=TOKEN, retries=12, backoff=1.0, max_backoff=5.0, batch_size=2)
    os.kill(replicas[0], signal.SIGKILL)
    answer = reward.score(fixture_images)  # sent while the replica is gone: retried until its replacement answers
    np.testing.assert_allclose(answer["scores"], golden["base_scores"], atol=TOLERANCE, rtol=0)
    replaced = [pid for pid in descendants(server["process"].pid) if "ServeReplica" in command_line(pid)]
    assert replaced and replicas[0] not in replaced


@pytest.mark.skipif(not os.environ.get("ARTQUANT_CLIENT_VENV"), reason="set ARTQUANT_CLIENT_VENV to a venv with flow_grpo's pins + artquant-client")
def test_client_in_a_flow_grpo_venv_gets_golden_scores(server, reference_images, golden):
    """The conflict is gone: transformers 4.40 / peft 0.10 / diffusers 0.33 beside artquant-client."""
    python = Path(os.environ["ARTQUANT_CLIENT_VENV"]) / "bin" / "python"
    script = (
        "import json, sys, numpy as np, torch, transformers, peft, diffusers\n"
        "from PIL import Image\n"
        "from artquant_client import RemoteReward\n"
        f"reward_fn = RemoteReward({server['url']!r}, token={TOKEN!r}).multi_score({{'artquant': 1.0}})\n"
        "scores = {}\n"
        "for group in json.loads(sys.argv[1]):  # flow_grpo's batches: float NCHW tensors of one size\n"
        "    images = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert('RGB'))).permute(2, 0, 1) for p in group]).float() / 255\n"
        "    details, _ = reward_fn(images, ['a prompt'] * len(group), [{}] * len(group), only_strict=True)\n"
        "    scores.update(zip(group, details['artquant']))\n"
        "print(json.dumps({'versions': [transformers.__version__, peft.__version__, diffusers.__version__], 'scores': scores}))\n"
    )
    groups: dict = {}
    for path in reference_images:
        groups.setdefault(Image.open(path).size, []).append(str(path))
    result = subprocess.run([str(python), "-c", script, json.dumps(list(groups.values()))], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["versions"] == ["4.40.0", "0.10.0", "0.33.1"]
    got = [output["scores"][str(path)] for path in reference_images]
    np.testing.assert_allclose(got, golden["base_scores"], atol=TOLERANCE, rtol=0)


def test_serve_refuses_to_bind_beyond_loopback_without_a_token(monkeypatch, capsys):
    from artquant.cli import main

    monkeypatch.delenv("ARTQUANT_SERVE_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2  # refused before Ray or the model start
    assert "--host 0.0.0.0 is reachable beyond this machine: set ARTQUANT_SERVE_TOKEN" in capsys.readouterr().err


def test_a_qrealign_preset_is_served_in_batches_of_different_sized_images(qrealign_dir, qrealign_images, qrealign_golden,
                                                                          tmp_path):
    """A Q-ReAlign server (the tiny Qwen3.5-VL): /info gives its 0..1 scale; concurrent clients' images of different
    sizes share model calls and get the authors' scores."""
    args = ["--model", str(qrealign_dir), "--preset", "qrealign-mini-aesthetics", "--dtype", "fp32",
            "--batch-wait-timeout", "0.25"]
    url, process = _serving(args, tmp_path / "serve.log")
    try:
        info = RemoteReward(url, token=TOKEN).info()
        assert info["preset"] == "qrealign-mini-aesthetics" and info["score_range"] == [0.0, 1.0]
        assert info["level_weights"] == [1.0, 0.75, 0.5, 0.25, 0.0]
        images = [Image.open(path).convert("RGB") for path in qrealign_images]
        start = threading.Barrier(3)

        def client(k: int):
            start.wait()
            return RemoteReward(url, token=TOKEN, retries=2).score(images[2 * k : 2 * k + 2])

        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(client, range(3)))
        scores = [score for answer in answers for score in answer["scores"]]
        expected = [qrealign_golden["scores"]["aesthetics"][path.name] for path in qrealign_images]
        np.testing.assert_allclose(scores, expected, atol=TOLERANCE, rtol=0)
        assert RemoteReward(url, token=TOKEN).info()["replica"]["largest_batch"] > 2  # clients' requests joined
    finally:
        stop(process)
