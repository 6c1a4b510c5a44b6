"""artquant-client on its own: image conversion, the reward contracts, retries, time-outs (a stdlib test server)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from artquant.client import RemoteReward, RemoteRewardError, images_to_uint8


class FakeServer:
    """Answers /score with a scripted sequence of statuses; the score of an image is its mean pixel / 25.5."""

    def __init__(self, statuses: list[int], delay_s: float = 0.0):
        self.statuses, self.delay_s, self.requests = list(statuses), delay_s, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                owner.requests.append((self.headers.get("Authorization"), self.headers["Content-Type"], body))
                status = owner.statuses.pop(0) if owner.statuses else 200
                if owner.delay_s:
                    threading.Event().wait(owner.delay_s)
                if status != 200:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(json.dumps({"detail": f"scripted {status}"}).encode())
                    return
                images = _images_from_multipart(body, self.headers["Content-Type"])
                scores = [float(np.asarray(image).mean() / 25.5) for image in images]
                answer = {"scores": scores, "stds": [1.0] * len(scores), "level_names": ["a", "b"],
                          "level_probs": [[0.25, 0.75]] * len(scores), "batch_sizes": [len(scores)] * len(scores)}
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps(answer).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.handle_error = lambda *args: None  # a client that timed out closed the socket: expected here
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _images_from_multipart(body: bytes, content_type: str) -> list[Image.Image]:
    import io

    boundary = content_type.split("boundary=")[1].encode()
    parts = [p for p in body.split(b"--" + boundary) if p.strip() not in (b"", b"--")]
    return [Image.open(io.BytesIO(p.split(b"\r\n\r\n", 1)[1][:-2])) for p in parts]


@pytest.fixture
def fake():
    servers = []

    def make(statuses=(), delay_s=0.0):
        servers.append(FakeServer(list(statuses), delay_s))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_images_arrive_as_the_trainer_holds_them():
    grey = np.full((2, 5, 6, 3), 51, np.uint8)
    for given in (
        grey,                                                       # numpy NHWC uint8
        torch.from_numpy(grey).permute(0, 3, 1, 2).float() / 255,  # torch NCHW float in [0, 1] (ddpo, flow_grpo)
        torch.from_numpy(grey).permute(0, 3, 1, 2).to(torch.bfloat16) / 255,
        [Image.fromarray(grey[0]), Image.fromarray(grey[1]).convert("RGBA")],
    ):
        arrays = images_to_uint8(given)
        assert [a.shape for a in arrays] == [(5, 6, 3)] * 2 and all(a.dtype == np.uint8 and (a == 51).all() for a in arrays)


BAD_IMAGES = [
    (np.zeros((5, 6)), "expected a batch [B, C, H, W] or [B, H, W, C], got shape (5, 6)"),
    (np.zeros((1, 4, 4, 3), np.int64), "image 0: use uint8 or float in [0, 1], not int64"),
]


@pytest.mark.parametrize("images, fragment", BAD_IMAGES)
def test_unusable_images_are_refused_with_a_message(images, fragment):
    with pytest.raises(ValueError) as error:
        images_to_uint8(images)
    assert fragment in str(error.value)


def test_ddpo_and_flow_grpo_contracts(fake):
    server = fake()
    images = torch.stack([torch.full((3, 8, 8), v / 255) for v in (51, 102, 153)])
    reward = RemoteReward(server.url, token="tok", batch_size=2)
    rewards, info = reward(images, ["p"] * 3, [{}] * 3)
    np.testing.assert_allclose(rewards, [2.0, 4.0, 6.0], atol=1e-6)
    assert info["std"].shape == (3,) and info["level_probs"].shape == (3, 2)
    assert len(server.requests) == 2 and all(r[0] == "Bearer tok" for r in server.requests)  # 2 + 1 images
    details, extra = reward.multi_score({"artquant": 0.5})(images, ["p"] * 3, [{}] * 3, only_strict=False)
    np.testing.assert_allclose(details["artquant"], [2.0, 4.0, 6.0], atol=1e-6)
    np.testing.assert_allclose(details["avg"], [1.0, 2.0, 3.0], atol=1e-6)
    assert extra == {}
    with pytest.raises(ValueError, match="provides the score 'artquant', not \\['pickscore'\\]"):
        reward.multi_score({"artquant": 1.0, "pickscore": 1.0})


def test_overload_and_server_errors_are_retried_until_an_answer(fake):
    server = fake([503, 500, 502])
    reward = RemoteReward(server.url, retries=3, backoff=0.01)
    np.testing.assert_allclose(reward(np.full((1, 4, 4, 3), 51, np.uint8))[0], [2.0], atol=1e-6)
    assert len(server.requests) == 4


def test_client_errors_are_not_retried_and_carry_the_server_message(fake):
    server = fake([400])
    with pytest.raises(RemoteRewardError, match="HTTP 400: scripted 400"):
        RemoteReward(server.url, retries=5, backoff=0.01).score(np.zeros((1, 4, 4, 3), np.uint8))
    assert len(server.requests) == 1


def test_retries_run_out_with_the_last_status(fake):
    server = fake([503] * 3)
    with pytest.raises(RemoteRewardError, match="HTTP 503: scripted 503"):
        RemoteReward(server.url, retries=2, backoff=0.01).score(np.zeros((1, 4, 4, 3), np.uint8))
    assert len(server.requests) == 3


def test_a_slow_server_times_out_and_an_absent_one_is_reported(fake):
    server = fake(delay_s=2.0)
    with pytest.raises(RemoteRewardError, match="unreachable after 1 tries"):
        RemoteReward(server.url, timeout=0.2, retries=0).score(np.zeros((1, 4, 4, 3), np.uint8))
    closed = FakeServer([])
    url = closed.url
    closed.close()
    with pytest.raises(RemoteRewardError, match="unreachable after 3 tries"):
        RemoteReward(url, retries=2, backoff=0.01).score(np.zeros((1, 4, 4, 3), np.uint8))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="batch_size and concurrency must be at least 1"):
        RemoteReward("http://127.0.0.1:1", batch_size=0)
