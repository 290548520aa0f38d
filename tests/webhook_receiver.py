"""A local payment-provider webhook for the tests: counts the meter events it took, fails when told to."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    """Takes POSTed batches of meter events on 127.0.0.1; answers 500 to the first `fail_first` posts."""

    def __init__(self, secret: str = "", fail_first: int = 0) -> None:
        self.secret = secret
        self.fail_first = fail_first
        self.posts = 0
        self.failed = 0
        # identifier -> event, and how often each identifier arrived in an accepted batch.
        self.events: dict[str, dict[str, Any]] = {}
        self.seen: Counter[str] = Counter()
        self.bad_signatures = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                status = receiver._take(body, self.headers.get("meshserve-signature", ""))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/meter_events"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _take(self, body: bytes, signature: str) -> int:
        with self._lock:
            self.posts += 1
            if self.secret and not self._signed(body, signature):
                self.bad_signatures += 1
                return 400
            if self.posts <= self.fail_first:
                self.failed += 1
                return 500
            for event in json.loads(body)["data"]:
                self.seen[event["identifier"]] += 1
                self.events[event["identifier"]] = event
            return 200

    def _signed(self, body: bytes, signature: str) -> bool:
        parts = dict(p.split("=", 1) for p in signature.split(",") if "=" in p)
        want = hmac.new(self.secret.encode(), f"{parts.get('t', '')}.".encode() + body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(want, parts.get("v1", ""))

    def totals(self, key_id: str) -> tuple[int, int, int]:
        """Requests, prompt and completion tokens the events of key_id add up to."""
        with self._lock:
            payloads = [e["payload"] for e in self.events.values() if e["payload"]["key_id"] == key_id]
        return (
            sum(int(p["requests"]) for p in payloads),
            sum(int(p["prompt_tokens"]) for p in payloads),
            sum(int(p["completion_tokens"]) for p in payloads),
        )

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
