"""The Batch API on top of the fake OpenAI server: /v1/files, /v1/files/{id}/content, /v1/batches.

Each line is answered as /chat/completions would answer its body (`completion`), when the batch
is first retrieved after it was created (so one poll sees `in_progress` only with `hold_batches`).
Outcomes under test control: `error_rate` sends items to the error file (HTTP 500) the first
time a batch holds them; the first `expire_first` batches expire with only the first half of
their lines answered; `unparseable_rate` answers the first request of some items unparseably,
as FakeOpenAI(fault_rate=..., faults=("unparseable",)) does, so live and batch runs agree;
`hold_batches` keeps every batch in progress until `release_batches()`. A line for a model in
`missing_models` goes to the error file as a 404 model_not_found (or, with
`missing_model_at_create`, the create call itself is answered so). `on_call(method, path)` runs
after an upload or create took effect and before its reply (a test kills its client there).
GET /v1/batches lists batches newest first, paged by `after`/`limit`, metadata echoed.
`batch_log` records every Batch API call (method, path), so tests count uploads and creates.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fake_openai import FakeOpenAI, completion, item_hash


@dataclass
class FakeBatches(FakeOpenAI):
    error_rate: float = 0.0
    expire_first: int = 0
    unparseable_rate: float = 0.0
    hold_batches: bool = False
    max_batch_requests: int | None = None
    missing_model_at_create: bool = False
    on_call: Callable[[str, str], None] | None = None
    batch_log: list[tuple[str, str]] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    _item_attempts: dict[str, int] = field(default_factory=dict)
    _batch_release: threading.Event = field(default_factory=threading.Event)
    _polled: threading.Event = field(default_factory=threading.Event)

    def route_other(self, h: BaseHTTPRequestHandler, raw: bytes) -> bool:
        path = h.path.split("?")[0].rstrip("/")
        parts = path.split("/")  # ['', 'v1', 'files' | 'batches', id?, 'content'?]
        if len(parts) < 3 or parts[2] not in ("files", "batches"):
            return False
        with self._lock:
            self.batch_log.append((h.command, path))
        if h.command == "POST" and path == "/v1/files":
            return self._reply(h, self._upload(h, raw), path)
        if h.command == "GET" and len(parts) == 5 and parts[2] == "files" and parts[4] == "content":
            data = self.files.get(parts[3])
            return self._send(h, 200, data) or True if data is not None else self._missing(h)
        if h.command == "POST" and path == "/v1/batches":
            body = json.loads(raw)
            if self.missing_model_at_create and self._models(body["input_file_id"]) & set(self.missing_models):
                msg = {"error": {"message": "The model does not exist", "code": "model_not_found"}}
                return self._send(h, 404, json.dumps(msg).encode()) or True
            return self._reply(h, self._create(body), path)
        if h.command == "GET" and path == "/v1/batches":
            return self._reply(h, self._list(parse_qs(urlsplit(h.path).query)))
        if h.command == "GET" and len(parts) == 4 and parts[2] == "batches" and parts[3] in self.batches:
            self._polled.set()
            return self._reply(h, self._advance(parts[3]))
        return self._missing(h)

    # ------------------------------------------------------------------ endpoints
    def _reply(self, h: BaseHTTPRequestHandler, obj: dict[str, Any], hook: str | None = None) -> bool:
        if hook is not None and self.on_call is not None:
            self.on_call(h.command, hook)
        self._send(h, 200, json.dumps(obj).encode())
        return True

    def _missing(self, h: BaseHTTPRequestHandler) -> bool:
        self._send(h, 404, b'{"error": {"message": "No such object", "type": "invalid_request_error"}}')
        return True

    def _new_file(self, data: bytes, purpose: str, name: str) -> dict[str, Any]:
        with self._lock:
            file_id = f"file-{len(self.files) + 1}"
            self.files[file_id] = data
        return {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": name, "purpose": purpose, "status": "processed"}

    def _upload(self, h: BaseHTTPRequestHandler, raw: bytes) -> dict[str, Any]:
        head = f"Content-Type: {h.headers['Content-Type']}\r\n\r\n".encode()
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
        fields = {p.get_param("name", header="content-disposition"): p for p in msg.iter_parts()}
        purpose = fields["purpose"].get_content().strip()
        data = fields["file"].get_payload(decode=True)
        return self._new_file(data, purpose, fields["file"].get_filename() or "upload.jsonl")

    def _create(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            batch_id = f"batch_{len(self.batches) + 1}"
            self.batches[batch_id] = {
                "id": batch_id, "object": "batch", "endpoint": body["endpoint"], "errors": None,
                "input_file_id": body["input_file_id"], "completion_window": body["completion_window"],
                "status": "validating", "output_file_id": None, "error_file_id": None,
                "created_at": int(time.time()), "request_counts": {"total": 0, "completed": 0, "failed": 0},
                "metadata": body.get("metadata"),
            }
            return dict(self.batches[batch_id])

    def _models(self, file_id: str) -> set[str]:
        return {json.loads(x)["body"]["model"] for x in self.files.get(file_id, b"").splitlines() if x.strip()}

    def _list(self, query: dict[str, list[str]]) -> dict[str, Any]:
        with self._lock:
            ids = sorted(self.batches, key=lambda i: int(i.split("_")[1]), reverse=True)
            if "after" in query:
                ids = ids[ids.index(query["after"][0]) + 1:]
            limit = int(query.get("limit", ["20"])[0])
            page = [dict(self.batches[i]) for i in ids[:limit]]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(ids) > limit}

    def _advance(self, batch_id: str) -> dict[str, Any]:
        b = self.batches[batch_id]
        if b["status"] in ("validating", "in_progress"):
            if self.hold_batches and not self._batch_release.is_set():
                b["status"] = "in_progress"
            else:
                self._finish(b, expire=int(batch_id.split("_")[1]) <= self.expire_first)
        return dict(b)

    def _finish(self, b: dict[str, Any], expire: bool) -> None:
        lines = [json.loads(x) for x in self.files[b["input_file_id"]].splitlines() if x.strip()]
        if self.max_batch_requests is not None and len(lines) > self.max_batch_requests:
            b.update(status="failed", errors={"object": "list", "data": [
                {"code": "too_many_requests", "message": f"{len(lines)} requests > {self.max_batch_requests}"}]})
            return
        out, err = [], []
        for i, line in enumerate(lines):
            key, body = line["custom_id"], line["body"]
            if expire and i >= len(lines) // 2:
                err.append({"id": f"batch_req_{i}", "custom_id": key, "response": None, "error": {
                    "code": "batch_expired", "message": "not executed before the completion window expired"}})
                continue
            with self._lock:
                attempt = self._item_attempts.get(key, 0)
                self._item_attempts[key] = attempt + 1
            if body["model"] in self.missing_models:
                err.append({"id": f"batch_req_{i}", "custom_id": key, "error": None, "response": {
                    "status_code": 404, "request_id": "r", "body": {"error": {
                        "message": f"The model `{body['model']}` does not exist or you do not have access to it.",
                        "type": "invalid_request_error", "param": None, "code": "model_not_found"}}}})
                continue
            first_user = next(m["content"] for m in body["messages"] if m["role"] == "user")
            item = item_hash(first_user)
            if attempt == 0 and item % 1000 < self.error_rate * 1000:
                err.append({"id": f"batch_req_{i}", "custom_id": key, "error": None, "response": {
                    "status_code": 500, "request_id": "r", "body": {"error": {"message": "The server had an error"}}}})
                continue
            fault = "unparseable" if item % 1000 < self.unparseable_rate * 1000 and len(body["messages"]) <= 2 else None
            out.append({"id": f"batch_req_{i}", "custom_id": key, "error": None, "response": {
                "status_code": 200, "request_id": "r", "body": completion(body, fault, key, time.time())}})
        for name, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                data = "".join(json.dumps(r) + "\n" for r in rows).encode()
                b[name] = self._new_file(data, "batch_output", f"{name}.jsonl")["id"]
        b.update(status="expired" if expire else "completed",
                 request_counts={"total": len(lines), "completed": len(out), "failed": len(err)})

    # ------------------------------------------------------------------ helpers
    def count(self, method: str, path: str) -> int:
        with self._lock:
            return sum(1 for m, p in self.batch_log if (m, p) == (method, path))

    def wait_polled(self, timeout: float = 60.0) -> None:
        if not self._polled.wait(timeout):
            raise TimeoutError("fake server: no batch was retrieved")

    def release_batches(self) -> None:
        self._batch_release.set()
