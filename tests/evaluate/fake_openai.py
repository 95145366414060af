"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for judge tests.

``script(request_body, n)`` (n = 1-based request count) returns ``(status, content_or_error,
headers)``; the server records every request (path, headers, body) and the peak number of requests
in flight, so tests can check retries, the concurrency limit and what was sent.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Script = Callable[[dict[str, Any], int], tuple[int, str, dict[str, str]]]


def rating_reply(text: str) -> tuple[int, str, dict[str, str]]:
    return 200, text, {}


class FakeOpenAI:
    def __init__(self, script: Script, api_key: str | None = None, delay_s: float = 0.0) -> None:
        self.script = script
        self.api_key = api_key
        self.delay_s = delay_s
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    fake.requests.append(
                        {
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": body,
                        }
                    )
                    count = len(fake.requests)
                    fake.in_flight += 1
                    fake.peak_in_flight = max(fake.peak_in_flight, fake.in_flight)
                try:
                    time.sleep(fake.delay_s)
                    if (
                        fake.api_key is not None
                        and self.headers.get("Authorization") != f"Bearer {fake.api_key}"
                    ):
                        status, text, headers = 401, "Incorrect API key provided", {}
                    else:
                        status, text, headers = fake.script(body, count)
                    if status == 200:
                        payload = {
                            "id": f"chatcmpl-{count}",
                            "object": "chat.completion",
                            "created": 0,
                            "model": body.get("model"),
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": text},
                                    "finish_reason": "stop",
                                }
                            ],
                        }
                    else:
                        payload = {"error": {"message": text, "type": "error", "code": status}}
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

        return Handler
