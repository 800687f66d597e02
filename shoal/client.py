"""A small client for a running `shoal serve` (what `shoal chat --url` uses)."""

import json
from collections.abc import Iterator

import httpx


class ClientError(Exception):
    """The server refused or failed a request; the message is the server's."""


class RemoteChat:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def _check(self, response: httpx.Response) -> None:
        if response.status_code >= 400:
            response.read()
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            raise ClientError(f"{response.status_code}: {message}")

    def models(self) -> list[str]:
        try:
            response = self.http.get("/v1/models")
        except httpx.HTTPError as e:
            raise ClientError(f"cannot reach {self.http.base_url}: {e}") from e
        self._check(response)
        return [m["id"] for m in response.json()["data"]]

    def stream(self, model: str, messages: list[dict], **params: object) -> Iterator[str]:
        """Text deltas of one streamed chat completion."""
        body = {"model": model, "messages": messages, "stream": True, **params}
        try:
            with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
                self._check(response)
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise ClientError(chunk["error"]["message"])
                    for choice in chunk["choices"]:
                        if choice["delta"].get("content"):
                            yield choice["delta"]["content"]
        except httpx.HTTPError as e:
            raise ClientError(f"the connection to {self.http.base_url} failed: {e}") from e
