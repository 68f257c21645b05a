"""A deterministic OpenAI-compatible server for tests and the benchmark (stdlib only).

`/v1/chat/completions` answers from a hash of the first user message, so a run with injected
faults and a fault-free run get the same answers. Faults hit the first attempt of the items
whose hash falls in `fault_rate`, and the kind is picked from the hash too; a retry (same body)
or a re-ask (longer conversation) then succeeds.

Difficulty prompts get `"<score>\\n<explanation>"` with score in {1, 1.5, ..., 5}. Judge prompts
(user message starting with `[Question]`) get `"<s1> <s2>"`; an answer containing `<<a,b>>`
scores `a` when shown as Assistant 1 and `b` when shown as Assistant 2.

No test depends on this server's clock: a hung request waits until `stop()` (or `hang_s`, if
given) and `hold_after=N` parks every request after the first N until `release_held()`, so a
test can stop a client mid-run at a known point however slow the machine is (`wait_held`).
`drop()` then takes the server down as a crash would (parked requests hung up on, new
connections refused), and a new server started with `port=` the old one's brings it back.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULT_KINDS = ("429", "500", "hang", "malformed", "unparseable", "out_of_range")
SCORES = (1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5)
NEVER_PARSEABLE = "NEVER-PARSEABLE"
JUDGE_GARBLE = "JUDGE-GARBLE"


def item_hash(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:15], 16)


def expected_score(user_content: str) -> float:
    """The score the server gives a difficulty prompt (tests compare against it)."""
    return float(SCORES[item_hash(user_content) % len(SCORES)])


_ANS = re.compile(
    r"\[The Start of Assistant (\d)'s Answer\]\n(.*?)\n\n\[The End of Assistant \1's Answer\]",
    re.S,
)
_RULE = re.compile(r"<<\s*(\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*>>")


def judge_reply(user_content: str) -> str:
    answers = dict(_ANS.findall(user_content))
    if any(JUDGE_GARBLE in a for a in answers.values()):
        return "Both assistants did well overall."
    scores = []
    for pos in ("1", "2"):
        a = answers.get(pos, "")
        m = _RULE.search(a)
        if m:
            scores.append(m.group(1) if pos == "1" else m.group(2))
        else:
            scores.append(str(1 + item_hash(a) % 10))
    return f"{scores[0]} {scores[1]}\n"


def completion(body: dict[str, Any], fault: str | None, body_key: str, t_in: float) -> dict[str, Any]:
    """The chat completion the server answers `body` with (`fault`: an unparseable kind or None)."""
    messages = body["messages"]
    first_user = next(m["content"] for m in messages if m["role"] == "user")
    if first_user.startswith("[Question]"):
        content = judge_reply(first_user)
    elif NEVER_PARSEABLE in first_user:
        content = "I would rather not give a number.\nIt depends."
    elif fault == "unparseable":
        content = "This task is moderately hard.\nScore: maybe 3"
    elif fault == "out_of_range":
        content = "7\nVery hard indeed."
    else:
        s = expected_score(first_user)
        content = f"{s:g}\nRated {s:g}: the task needs about that much reasoning."
    prompt_chars = sum(len(m["content"]) for m in messages)
    return {
        "id": f"chatcmpl-{body_key[:12]}",
        "object": "chat.completion",
        "created": int(t_in),
        "model": body.get("model", "fake"),
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": prompt_chars // 4,
            "completion_tokens": len(content) // 4,
            "total_tokens": prompt_chars // 4 + len(content) // 4,
        },
    }


@dataclass
class FakeOpenAI:
    """Start with `with FakeOpenAI(...) as srv:`; `srv.base_url` is the /v1 root."""

    api_key: str | None = None
    latency: float = 0.0
    fault_rate: float = 0.0
    faults: tuple[str, ...] = FAULT_KINDS
    hang_s: float | None = None  # None: a hung request waits until stop()
    hold_after: int | None = None  # park every request after the first N until release_held()
    retry_after: str | None = "0.05"
    retry_after_ms: str | None = None
    missing_models: tuple[str, ...] = ()  # answered 404 model_not_found, as OpenAI does for a retired model
    port: int = 0  # 0: any free port
    log: list[dict[str, Any]] = field(default_factory=list)
    _attempts: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _released: threading.Event = field(default_factory=threading.Event)
    _dropped: threading.Event = field(default_factory=threading.Event)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _received: int = 0
    _in_flight: int = 0
    _held: int = 0

    def __enter__(self) -> FakeOpenAI:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> str:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802
                fake._handle(self)

            def do_GET(self) -> None:  # noqa: N802
                fake._handle(self)

        class Server(ThreadingHTTPServer):
            request_queue_size = 512
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                if not isinstance(sys.exc_info()[1], OSError):  # a client that hung up is not news
                    super().handle_error(request, client_address)

        self._server = Server(("127.0.0.1", self.port), Handler)
        # A short poll interval: shutdown() waits for one, and every test stops a server.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        return self.base_url

    def stop(self) -> None:
        self._stopping.set()
        self._released.set()
        self._server.shutdown()
        self._server.server_close()

    def drop(self) -> None:
        """Go down mid-run: stop listening (new connections are refused) and hang up on every
        parked request without an answer."""
        self._dropped.set()
        self._server.shutdown()
        self._server.server_close()
        self._released.set()

    @property
    def bound_port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    # ------------------------------------------------------------------ handling
    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None) -> bool:
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(body)
            h.wfile.flush()
            return True
        except (BrokenPipeError, ConnectionResetError, OSError):
            h.close_connection = True
            return False

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        with self._changed:
            self._received += 1
            self._in_flight += 1
            hold = self.hold_after is not None and self._received > self.hold_after
            self._held += hold
            self._changed.notify_all()
        try:
            if hold:
                self._released.wait()
            if self._dropped.is_set():
                h.close_connection = True  # hung up on, unanswered
                return
            self._handle_one(h)
        finally:
            with self._changed:
                self._in_flight -= 1
                self._changed.notify_all()

    def _handle_one(self, h: BaseHTTPRequestHandler) -> None:
        t_in = time.time()
        length = int(h.headers.get("Content-Length", "0"))
        raw = h.rfile.read(length)
        entry: dict[str, Any] = {"t_in": t_in, "path": h.path}
        if self.api_key is not None and h.headers.get("Authorization") != f"Bearer {self.api_key}":
            got = h.headers.get("Authorization", "")
            msg = {"error": {"message": f"Incorrect API key provided: {got}", "type": "invalid_request_error"}}
            self._send(h, 401, json.dumps(msg).encode())
            entry.update(status=401, t_out=time.time())
            with self._lock:
                self.log.append(entry)
            return
        if not h.path.rstrip("/").endswith("/chat/completions"):
            if self.route_other(h, raw):
                return
            self._send(h, 404, b'{"error": {"message": "not found"}}')
            return
        body = json.loads(raw)
        if body.get("model") in self.missing_models:
            msg = {"error": {"message": f"The model `{body['model']}` does not exist or you do not have access to it.",
                             "type": "invalid_request_error", "param": None, "code": "model_not_found"}}
            self._send(h, 404, json.dumps(msg).encode())
            entry.update(status=404, t_out=time.time())
            with self._lock:
                self.log.append(entry)
            return
        messages = body["messages"]
        first_user = next(m["content"] for m in messages if m["role"] == "user")
        item = item_hash(first_user)
        body_key = hashlib.sha256(raw).hexdigest()
        with self._lock:
            attempt = self._attempts.get(body_key, 0)
            self._attempts[body_key] = attempt + 1
        entry.update(item=item, body=body_key, attempt=attempt, n_messages=len(messages))
        if self.latency:
            time.sleep(self.latency)
        fault = None
        if attempt == 0 and (item % 1000) < self.fault_rate * 1000:
            fault = self.faults[(item // 1000) % len(self.faults)]
            if fault in ("unparseable", "out_of_range") and len(messages) > 2:
                fault = None  # a re-ask is answered properly
        entry["fault"] = fault
        status, answered = 200, False
        if fault == "429":
            headers = {}
            if self.retry_after is not None:
                headers["Retry-After"] = self.retry_after
            if self.retry_after_ms is not None:
                headers["retry-after-ms"] = self.retry_after_ms
            status = 429
            self._send(h, 429, b'{"error": {"message": "Rate limit reached", "type": "requests"}}', headers)
        elif fault == "500":
            status = 500
            self._send(h, 500, b'{"error": {"message": "The server had an error", "type": "server_error"}}')
        elif fault == "hang":
            entry.update(status=0, answered=False, t_out=None)
            with self._lock:
                self.log.append(entry)  # logged now: the client gives up long before we wake
            self._stopping.wait(self.hang_s)
            h.close_connection = True
            return
        elif fault == "malformed":
            self._send(h, 200, b'{"id": "chatcmpl-x", "object": "chat.completion", "choices": [{"index": 0, "mess')
        else:
            resp = completion(body, fault, body_key, t_in)
            answered = self._send(h, 200, json.dumps(resp).encode())
        entry.update(status=status, answered=answered, t_out=time.time())
        with self._lock:
            self.log.append(entry)

    def route_other(self, h: BaseHTTPRequestHandler, raw: bytes) -> bool:
        """Serve a path other than /chat/completions (subclasses add endpoints); False: 404."""
        return False

    # ------------------------------------------------------------------ helpers
    def entries(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.log)

    def reset_log(self) -> None:
        with self._lock:
            self.log.clear()

    def wait_held(self, n: int = 1, timeout: float = 60.0) -> None:
        """Block until `n` requests are parked by `hold_after` (TimeoutError after `timeout` s)."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._held >= n, timeout):
                raise TimeoutError(f"fake server: {self._held} of {n} requests parked after {timeout:g} s")

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Block until no request is being handled (TimeoutError after `timeout` s)."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._in_flight == 0, timeout):
                raise TimeoutError(f"fake server: {self._in_flight} requests in flight after {timeout:g} s")

    def release_held(self) -> None:
        """Let every parked request (and any later one) through."""
        self._released.set()


if __name__ == "__main__":  # manual use: python tests/tools/fake_openai.py
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--fault-rate", type=float, default=0.0)
    a = p.parse_args()
    srv = FakeOpenAI(latency=a.latency, fault_rate=a.fault_rate)
    print(srv.start(), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()
