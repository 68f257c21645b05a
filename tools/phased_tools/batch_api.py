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

from phased_tools.asker import (
    extract_reply,
    model_not_found,
    retired_model_message,
    unreachable_message,
    unreachable_reason,
)
from phased_tools.cache import CachedAnswer
from phased_tools.chat import FatalError, ParseError
from phased_tools.client_config import ClientConfig

ENDPOINT = "/v1/chat/completions"
TERMINAL = ("completed", "expired", "failed", "cancelled")
TOKEN = "phased_token"  # the batch metadata key naming the ledger intent it was created for


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
    code: str | None = None  # the error's code, e.g. model_not_found


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
        code = error.get("code")
        return OutputLine(key, None, f"{code or 'error'}: {str(error.get('message'))[:200]}", code)
    if isinstance(response, dict):
        body = response.get("body")
        err = body.get("error") if isinstance(body, dict) else None
        err = err if isinstance(err, dict) else {}
        return OutputLine(key, None, f"HTTP {response.get('status_code')}: {str(err.get('message', ''))[:200]}",
                          err.get("code"))
    raise ValueError("a batch output line needs a \"response\" or an \"error\"")


class BatchClient:
    """Upload, create, retrieve and download through the openai client; errors become FatalError.

    The first call goes out once, without the client's retries: a server that refuses it or
    whose host name is unknown is one line at once (as for live requests), not ~40 s of
    retries. Any other failure of that call is sent again through the retrying client.
    """

    def __init__(self, cfg: ClientConfig, api_key: str, redact: Callable[[str], str]) -> None:
        self.redact, self.model = redact, cfg.model
        self.client = openai.OpenAI(api_key=api_key, base_url=cfg.base_url, timeout=cfg.timeout,
                                    max_retries=cfg.max_retries)
        self.reached = False

    def _first(self, fn: Callable[[openai.OpenAI], Any]) -> Any:
        """`fn` while the server has not been reached yet: once, then with retries unless unreachable."""
        try:
            result = fn(self.client.with_options(max_retries=0))
        except openai.APIConnectionError as e:
            if (why := unreachable_reason(e)) is not None:
                raise FatalError(unreachable_message(self.redact(str(self.client.base_url)), why)) from None
            result = fn(self.client)
        except openai.APIStatusError:
            result = fn(self.client)
        self.reached = True
        return result

    def _call(self, what: str, fn: Callable[[openai.OpenAI], Any]) -> Any:
        try:
            return fn(self.client) if self.reached else self._first(fn)
        except openai.APIStatusError as e:
            if e.status_code in (401, 403):
                why = "authentication failed; check OPENAI_API_KEY and --base-url"
            elif e.status_code == 404 and model_not_found(e, self.model):
                raise FatalError(retired_model_message(self.model)) from None
            elif e.status_code == 404 and what in ("upload", "create"):
                why = ("this server has no Batch API; for a local server use --batch-export, "
                       "vLLM's run-batch, then --batch-import")
            else:
                why = self.redact(str(e.message))[:300]
            raise FatalError(f"Batch API {what}: HTTP {e.status_code}: {why}") from None
        except openai.APIError as e:
            raise FatalError(f"Batch API {what}: {self.redact(type(e).__name__)}; batches already created are "
                             "recorded in the cache: run again to re-attach to them") from None

    def submit(self, data: bytes, token: str) -> str:
        """Upload one input file and create its batch, tagged with `token`; the batch id."""
        f = self._call("upload", lambda c: c.files.create(
            file=("requests.jsonl", data, "application/jsonl"), purpose="batch"))
        b = self._call("create", lambda c: c.batches.create(
            input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h", metadata={TOKEN: token}))
        return str(b.id)

    def find_tokens(self, tokens: set[str], since: float) -> dict[str, str]:
        """token -> batch id for the batches carrying these tokens, looking back (newest first)
        to the batches created before `since` (a unix time)."""
        def scan(client: openai.OpenAI) -> dict[str, str]:
            found: dict[str, str] = {}
            for b in client.batches.list(limit=100):  # every page, while iterating
                token = (getattr(b, "metadata", None) or {}).get(TOKEN)
                if token in tokens:
                    found[token] = str(b.id)
                if len(found) == len(tokens) or (b.created_at or since) < since:
                    break
            return found

        return self._call("list", scan)

    def retrieve(self, batch_id: str) -> Any:
        return self._call("retrieve", lambda c: c.batches.retrieve(batch_id))

    def download(self, file_id: str) -> str:
        return self._call("download", lambda c: c.files.content(file_id).text)

    def close(self) -> None:
        self.client.close()
