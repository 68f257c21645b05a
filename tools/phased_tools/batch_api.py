"""The Batch API's files: request lines written, split to the per-batch limits, output lines read.

A request line is `{"custom_id": <cache key>, "method": "POST", "url": "/v1/chat/completions",
"body": <the body a live request sends>}`; an output line (OpenAI's, or vLLM `run-batch`'s) is
`{"custom_id", "response": {"status_code", "body"}, "error"}`. Replies are read with the live
asker's parser, so a batch answer and a live one are stored alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import openai

from phased_tools.asker import extract_reply
from phased_tools.cache import CachedAnswer
from phased_tools.chat import FatalError, ParseError
from phased_tools.client_config import ClientConfig

ENDPOINT = "/v1/chat/completions"
TERMINAL = ("completed", "expired", "failed", "cancelled")


def request_line(key: str, body: dict[str, Any]) -> bytes:
    """One line of a batch input file (with its newline)."""
    line = {"custom_id": key, "method": "POST", "url": ENDPOINT, "body": body}
    return (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")


def split_lines(lines: dict[str, bytes], max_requests: int, max_bytes: int) -> list[dict[str, bytes]]:
    """Consecutive groups of lines, each within both per-batch limits (a line alone always fits)."""
    groups: list[dict[str, bytes]] = []
    size = 0
    for key, line in lines.items():
        if not groups or len(groups[-1]) >= max_requests or size + len(line) > max_bytes:
            groups.append({})
            size = 0
        groups[-1][key] = line
        size += len(line)
    return groups


@dataclass(frozen=True)
class OutputLine:
    """One line of a batch output or error file: an answer, or why there is none."""

    key: str
    answer: CachedAnswer | None
    error: str | None


def read_output_line(obj: Any) -> OutputLine:
    """The answer in one output-file object; ValueError when it is not a batch output line."""
    if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
        raise ValueError("not a batch output line (no string \"custom_id\")")
    key = obj["custom_id"]
    response, error = obj.get("response"), obj.get("error")
    if isinstance(response, dict) and response.get("status_code") == 200:
        try:
            content, finish, usage = extract_reply(response.get("body"))
        except (ParseError, ValueError, TypeError) as e:
            return OutputLine(key, None, f"malformed response: {e}")
        return OutputLine(key, CachedAnswer(content, finish, *usage), None)
    if isinstance(error, dict) and error:
        return OutputLine(key, None, f"{error.get('code') or 'error'}: {str(error.get('message'))[:200]}")
    if isinstance(response, dict):
        body = response.get("body")
        msg = (body.get("error") or {}).get("message", "") if isinstance(body, dict) else ""
        return OutputLine(key, None, f"HTTP {response.get('status_code')}: {str(msg)[:200]}")
    raise ValueError("a batch output line needs a \"response\" or an \"error\"")


class BatchClient:
    """Upload, create, retrieve and download through the openai client; errors become FatalError."""

    def __init__(self, cfg: ClientConfig, api_key: str, redact: Callable[[str], str]) -> None:
        self.redact = redact
        self.client = openai.OpenAI(api_key=api_key, base_url=cfg.base_url, timeout=cfg.timeout,
                                    max_retries=cfg.max_retries)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except openai.APIStatusError as e:
            if e.status_code in (401, 403):
                why = "authentication failed; check OPENAI_API_KEY and --base-url"
            elif e.status_code == 404 and what in ("upload", "create"):
                why = ("this server has no Batch API; for a local server use --batch-export, "
                       "vLLM's run-batch, then --batch-import")
            else:
                why = self.redact(str(e.message))[:300]
            raise FatalError(f"Batch API {what}: HTTP {e.status_code}: {why}") from None
        except openai.APIError as e:
            raise FatalError(f"Batch API {what}: {self.redact(type(e).__name__)}; batches already created are "
                             "recorded in the cache: run again to re-attach to them") from None

    def submit(self, data: bytes) -> str:
        """Upload one input file and create its batch; the batch id."""
        f = self._call("upload", lambda: self.client.files.create(
            file=("requests.jsonl", data, "application/jsonl"), purpose="batch"))
        b = self._call("create", lambda: self.client.batches.create(
            input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h"))
        return str(b.id)

    def retrieve(self, batch_id: str) -> Any:
        return self._call("retrieve", lambda: self.client.batches.retrieve(batch_id))

    def download(self, file_id: str) -> str:
        return self._call("download", lambda: self.client.files.content(file_id).text)

    def close(self) -> None:
        self.client.close()
