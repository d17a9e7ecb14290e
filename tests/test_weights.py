"""The one weight placer and retry policy (cfaudit.weights): what is retried, what is final, what is reported."""

from __future__ import annotations

import http.server
import threading
import urllib.error

import pytest
import torch

from cfaudit.weights import RetriesExhausted, RetryPolicy, call_with_retries, download, state_dict_mismatch


def test_policy_doubles_and_caps():
    p = RetryPolicy(retries=6, backoff_s=2.0, max_wait_s=20.0)
    assert [p.wait(k) for k in range(5)] == [2.0, 4.0, 8.0, 16.0, 20.0]


def test_call_with_retries_waits_then_gives_up_or_reraises():
    slept, calls = [], []

    def flaky():
        calls.append(1)
        raise ConnectionError("reset")

    with pytest.raises(RetriesExhausted, match=r"failed after 3 attempts \(reset\)"):
        call_with_retries(flaky, RetryPolicy(2, 1.0), lambda e: (str(e), None), sleep=slept.append)
    assert len(calls) == 3 and slept == [1.0, 2.0]
    with pytest.raises(KeyError):  # not transient: raised at once, no wait
        call_with_retries(lambda: {}["x"], RetryPolicy(2), lambda e: None, sleep=slept.append)
    assert slept == [1.0, 2.0]
    assert call_with_retries(lambda: 5, RetryPolicy(0), lambda e: None) == 5


@pytest.fixture
def server():
    """Loopback HTTP: /503 fails twice then serves, /404 always 404."""
    hits: dict[str, int] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] = hits.get(self.path, 0) + 1
            if self.path == "/404" or (self.path == "/503" and hits[self.path] <= 2):
                self.send_error(404 if self.path == "/404" else 503)
                return
            self.send_response(200)
            self.send_header("Content-Length", "7")
            self.end_headers()
            self.wfile.write(b"weights")

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", hits
    finally:
        srv.shutdown()


def test_download_retries_5xx_but_not_404(tmp_path, server):
    base, hits = server
    slept = []
    download(f"{base}/503", tmp_path / "w.pth", policy=RetryPolicy(3, 0.5), sleep=slept.append, timeout_s=10)
    assert (tmp_path / "w.pth").read_bytes() == b"weights" and hits["/503"] == 3 and slept == [0.5, 1.0]
    with pytest.raises(urllib.error.HTTPError):
        download(f"{base}/404", tmp_path / "x.pth", policy=RetryPolicy(3), sleep=slept.append, timeout_s=10)
    assert hits["/404"] == 1 and not (tmp_path / "x.pth").exists() and not list(tmp_path.glob(".*part"))
    with pytest.raises(ValueError, match="not an http"):
        download("ftp://example.org/w.pth", tmp_path / "y.pth")


def test_state_dict_mismatch_names_keys_and_shapes():
    model = {"a": torch.zeros(2), "b": torch.zeros(3, 4), "c": torch.zeros(1)}
    got = state_dict_mismatch(model, {"a": torch.zeros(2), "b": torch.zeros(4, 3), "d": torch.zeros(1)})
    assert got.missing == ["c"] and got.unexpected == ["d"] and got.misshaped == [("b", (4, 3), (3, 4))]
    assert got.describe() == "1 missing: c; 1 unexpected: d; 1 mis-shaped: b (file (4, 3), model (3, 4))"
    assert not state_dict_mismatch(model, dict(model))
