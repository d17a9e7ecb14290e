"""A loopback HTTP server imitating the ISIC Archive API v2 endpoints that isic-cli and cfaudit use.

Endpoints (under ``/api/v2/``, answering like api.isic-archive.com):

- ``collections/{id}/``                      collection record (404 if unknown)
- ``images/search/?query=&collections=&limit=&cursor=``  paged search; ``next`` is an absolute URL
- ``images/search/size/?query=&collections=`` total bytes of the matching files
- ``images/{isic_id}/``                      one image record (metadata, attribution, licence, file URLs)
- ``zip-download/license-file/{licence}/``   licence text
- ``/files/{isic_id}.jpg?sig=...``           the image bytes (stands in for the signed S3 URLs)

Images are small, valid, seeded JPEGs. The query language is a tiny subset of the Archive's:
``field:value`` terms (value optionally double-quoted) joined by `` AND ``; anything else is a 400.

Fault injection: ``server.faults[path] = [503, (429, {"Retry-After": "0"}), "truncate", ("delay", 5), 404]`` makes the
next requests of that path (no query string) fail in that order (``truncate``: half the promised bytes,
then the connection closes; ``delay``: a stall before the normal answer) before it answers normally again.
``server.requests`` records every request as ``(method, path, query)``.
"""

from __future__ import annotations

import io
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

import numpy as np
from PIL import Image

LICENCES = ["CC-0", "CC-BY", "CC-BY-NC"]


@dataclass
class FakeImage:
    isic_id: str
    data: bytes
    collections: list[int]
    attribution: str
    licence: str
    acquisition: dict
    clinical: dict


def make_jpeg(seed: int, size: int = 48) -> bytes:
    """A small valid JPEG: a skin-coloured field with a dark blob (seeded)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    r = rng.uniform(0.15, 0.3) * size
    blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
    img = np.empty((size, size, 3), np.uint8)
    img[:] = rng.integers(170, 230, 3)
    img[blob] = rng.integers(40, 110, 3)
    img = np.clip(img.astype(int) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_images(n: int = 8, collections: dict[int, list[int]] | None = None) -> list[FakeImage]:
    """``n`` records: diagnosis_1 alternates Benign / Malignant, every 6th is Indeterminate, the last has none;
    optional fields (sex, dermoscopic_type) are present on some records only."""
    images = []
    for i in range(n):
        diagnosis = "Indeterminate" if i % 6 == 5 else ("Benign" if i % 2 == 0 else "Malignant")
        clinical = {"diagnosis_1": diagnosis, "age_approx": 30 + 5 * i}
        if i % 2 == 0:
            clinical["sex"] = "female" if i % 4 == 0 else "male"
        if i == n - 1:
            clinical.pop("diagnosis_1")  # a record without a diagnosis (never assume a column exists)
        acquisition = {"image_type": "dermoscopic", "pixels_x": 48, "pixels_y": 48}
        if i % 3 == 1:
            acquisition["dermoscopic_type"] = "contact polarized"
        cols = [c for c, members in (collections or {}).items() if i in members]
        images.append(FakeImage(
            isic_id=f"ISIC_{9000000 + i:07d}",
            data=make_jpeg(1000 + i),
            collections=cols,
            attribution="Anonymous" if i % 4 == 3 else f"Test Hospital {i % 2}",
            licence=LICENCES[i % 3],
            acquisition=acquisition,
            clinical=clinical,
        ))
    return images


@dataclass
class IsicTestServer:
    images: list[FakeImage]
    page_size: int = 2
    faults: dict[str, list] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._by_id = {im.isic_id: im for im in self.images}
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.root = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.root}/api/v2/"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="isic-test-server", daemon=True)

    # lifecycle -----------------------------------------------------------------------------------
    def start(self) -> "IsicTestServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # bookkeeping ---------------------------------------------------------------------------------
    def count(self, path_prefix: str, method: str = "GET") -> int:
        with self._lock:
            return sum(1 for m, p, _ in self.requests if m == method and p.startswith(path_prefix))

    def file_requests(self) -> list[str]:
        with self._lock:
            return [p.rsplit("/", 1)[1].split(".")[0] for m, p, _ in self.requests if p.startswith("/files/")]

    def _log(self, method, path, query):
        with self._lock:
            self.requests.append((method, path, query))

    def _next_fault(self, path):
        with self._lock:
            queue = self.faults.get(path)
            return queue.pop(0) if queue else None

    # API -----------------------------------------------------------------------------------------
    def record(self, im: FakeImage) -> dict:
        return {
            "isic_id": im.isic_id,
            "public": True,
            "copyright_license": im.licence,
            "attribution": im.attribution,
            "metadata": {"acquisition": dict(im.acquisition), "clinical": dict(im.clinical)},
            "files": {
                "full": {"url": f"{self.root}/files/{im.isic_id}.jpg?sig=abc123", "size": len(im.data)},
                "thumbnail_256": {"url": f"{self.root}/files/{im.isic_id}_thumb.jpg", "size": 0},
            },
        }

    def search(self, query: str, collections: str) -> list[FakeImage]:
        """Matching images in archive order; raises ValueError on an unsupported query."""
        wanted = {int(c) for c in collections.split(",") if c.strip()} if collections else set()
        terms = []
        if query.strip():
            for term in query.split(" AND "):
                key, sep, value = term.strip().partition(":")
                if not sep or not key or not value or " " in key:
                    raise ValueError(f"Invalid query: cannot parse {term!r}")
                terms.append((key, value.strip().strip('"')))
        out = []
        for im in self.images:
            if wanted and not wanted.intersection(im.collections):
                continue
            fields = {**im.acquisition, **im.clinical}
            if all(str(fields.get(k)) == v for k, v in terms):
                out.append(im)
        return out


def _make_handler(server: IsicTestServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output quiet
            pass

        def _send(self, status: int, body: bytes, ctype: str = "application/json", headers=None, length=None):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()

        def _json(self, obj, status=200):
            self._send(status, json.dumps(obj).encode())

        def do_GET(self):  # noqa: C901, N802
            parts = urlsplit(self.path)
            path, qs = parts.path, parse_qs(parts.query, keep_blank_values=True)
            server._log("GET", path, parts.query)
            fault = server._next_fault(path)
            if isinstance(fault, tuple) and fault[0] == "delay":
                time.sleep(fault[1])  # a stalled server: then answer normally
                fault = None
            if fault is not None:
                status, headers = (fault if isinstance(fault, tuple) else (fault, {}))
                if status == "truncate":
                    im = server._by_id.get(path.rsplit("/", 1)[-1].split(".")[0])
                    data = im.data if im else b"x" * 100
                    # promise the whole file, send half, close: a broken transfer
                    self._send(200, data[: len(data) // 2], "image/jpeg", length=len(data))
                    self.close_connection = True
                    return
                self._send(status, json.dumps({"detail": f"injected {status}"}).encode(), headers=headers)
                return

            def q(name):
                return qs.get(name, [""])[0]

            api = "/api/v2/"
            if path.startswith("/files/"):
                im = server._by_id.get(path[len("/files/"):].split(".")[0])
                if im is None:
                    return self._json({"detail": "Not found."}, 404)
                return self._send(200, im.data, "image/jpeg")
            if not path.startswith(api):
                return self._json({"detail": "Not found."}, 404)
            rest = path[len(api):]
            if rest.startswith("collections/"):
                cid = rest.split("/")[1]
                ids = {c for im in server.images for c in im.collections}
                if not cid.isdigit() or int(cid) not in ids:
                    return self._json({"detail": "Not found."}, 404)
                return self._json({"id": int(cid), "name": f"Test collection {cid}", "public": True,
                                   "pinned": False, "locked": True, "doi": None})
            if rest == "images/search/size/":
                try:
                    found = server.search(q("query"), q("collections"))
                except ValueError as err:
                    return self._json({"message": str(err)}, 400)
                return self._json({"size": sum(len(im.data) for im in found)})
            if rest == "images/search/":
                try:
                    found = server.search(q("query"), q("collections"))
                except ValueError as err:
                    return self._json({"message": str(err)}, 400)
                limit = int(q("limit") or server.page_size)
                start = int(q("cursor") or 0)
                page = found[start:start + limit]
                nxt = None
                if start + limit < len(found):
                    params = {"query": q("query"), "collections": q("collections"), "cursor": start + limit}
                    if q("limit"):
                        params["limit"] = limit
                    nxt = f"{server.root}{api}images/search/?{urlencode(params)}"
                return self._json({"count": len(found), "next": nxt, "previous": None,
                                   "results": [server.record(im) for im in page]})
            if rest.startswith("images/"):
                im = server._by_id.get(rest.split("/")[1])
                if im is None:
                    return self._json({"detail": "Not found."}, 404)
                return self._json(server.record(im))
            if rest.startswith("zip-download/license-file/"):
                lic = rest.split("/")[2]
                if lic not in LICENCES:
                    return self._json({"detail": "Not found."}, 404)
                return self._send(200, f"{lic} licence text (test server)\n".encode(), "text/plain")
            if rest == "users/me/":
                return self._json({"detail": "Authentication credentials were not provided."}, 401)
            return self._json({"detail": "Not found."}, 404)

    return Handler
