"""A local HTTP server on 127.0.0.1 that answers like the Materials Project API (for tests).

It serves ``/heartbeat`` (database version) and ``/materials/summary/`` with the filters the
mp-api client sends (``elements``, ``band_gap_min``, ``energy_above_hull_max``, ``_limit``, ``_skip``,
``_fields``), so that tests exercise the real mp-api client code path. ``fail_first`` makes the
first N summary requests answer 503, to test retries with backoff.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


class FakeMP:
    def __init__(self, docs: list[dict[str, Any]], db_version: str = "2025.09.25", fail_first: int = 0,
                 api_version: str = "0.87.0"):
        self.docs = docs
        self.db_version = db_version
        self.fail_first = fail_first
        self.api_version = api_version
        self.requests: list[str] = []
        self.keys: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, code: int, body: Any) -> None:
                blob = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(blob)))
                self.end_headers()
                self.wfile.write(blob)

            def do_GET(self) -> None:  # noqa: N802
                url = urlparse(self.path)
                server.requests.append(self.path)
                server.keys.append(self.headers.get("x-api-key"))
                q = {k: v[-1] for k, v in parse_qs(url.query).items()}
                if url.path.rstrip("/").endswith("heartbeat"):
                    self._send(200, {"db_version": server.db_version, "version": server.api_version,
                                     "access_controlled_batch_ids": []})
                    return
                if "/materials/summary" in url.path:
                    if server.fail_first > 0:
                        server.fail_first -= 1
                        self._send(503, {"detail": "Service Unavailable"})
                        return
                    self._send(200, server.search(q))
                    return
                self._send(404, {"detail": f"not found: {url.path}"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def search(self, q: dict[str, str]) -> dict[str, Any]:
        docs = self.docs
        if "elements" in q:
            want = set(q["elements"].split(","))
            docs = [d for d in docs if want <= set(d["elements"])]
        if "band_gap_min" in q:
            docs = [d for d in docs if d["band_gap"] >= float(q["band_gap_min"])]
        if "band_gap_max" in q:
            docs = [d for d in docs if d["band_gap"] <= float(q["band_gap_max"])]
        if "energy_above_hull_min" in q:
            docs = [d for d in docs if d["energy_above_hull"] >= float(q["energy_above_hull_min"])]
        if "energy_above_hull_max" in q:
            docs = [d for d in docs if d["energy_above_hull"] <= float(q["energy_above_hull_max"])]
        total = len(docs)
        skip = int(q.get("_skip", 0))
        limit = int(q.get("_limit", 1000))
        page = docs[skip: skip + limit]
        fields = q.get("_fields")
        if fields:
            keep = set(fields.split(","))
            page = [{k: v for k, v in d.items() if k in keep} for d in page]
        return {"data": page, "meta": {"total_doc": total, "max_limit": 1000}}

    def __enter__(self) -> "FakeMP":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
