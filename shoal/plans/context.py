"""What a running plan sees: its request, and the services its I/O operators call."""

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shoal.plans.registry import PlanError, default_env, load

MAX_USER_ID = 2**32 - 1


@dataclass(frozen=True)
class PlanRequest:
    user_id: int | None
    request_id: str
    params: dict[str, Any] = field(default_factory=dict)
    prompt: str | list | None = None  # what `generate` runs when it has no template

    @classmethod
    def parse(cls, body: Any, needs: tuple[str, ...] = ("user_id",)) -> "PlanRequest":
        """From {"user_id"?, "request_id"?, "param_overrides"?, "prompt"?}; `needs` are the fields the plan's
        operators read (viewer reads user_id). Every problem is named."""
        if not isinstance(body, dict):
            raise PlanError("a plan request is a JSON object")
        if unknown := set(body) - {"user_id", "request_id", "param_overrides", "prompt"}:
            raise PlanError(f"unknown request field(s): {', '.join(sorted(unknown))}")
        if missing := [f for f in needs if body.get(f) is None]:
            raise PlanError(f"missing required field: {', '.join(missing)}")
        user = body.get("user_id")
        if isinstance(user, str) and user.isdigit():
            user = int(user)
        if user is not None and (isinstance(user, bool) or not isinstance(user, int) or not 1 <= user <= MAX_USER_ID):
            raise PlanError(f"user_id must be an integer from 1 to {MAX_USER_ID}, got {body['user_id']!r}")
        request_id = body.get("request_id") or uuid.uuid4().hex
        if not isinstance(request_id, str):
            raise PlanError(f"request_id must be a string, got {request_id!r}")
        overrides = body.get("param_overrides") or {}
        if not isinstance(overrides, dict):
            raise PlanError("param_overrides must be an object")
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str) and not (isinstance(prompt, list) and prompt and (
                all(isinstance(m, dict) for m in prompt) or all(type(t) is int for t in prompt))):
            raise PlanError("prompt must be text, token ids or chat messages")
        return cls(user, request_id, {name: _param(name, value) for name, value in overrides.items()}, prompt)


def _param(name: str, value: Any) -> Any:
    spec = load().param(name)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if value is not None and not (number if spec.type in ("float", "int") else isinstance(value, str)):
        raise PlanError(f"param {name} must be a {spec.type} or null, got {value!r}")
    return float(value) if number and spec.type == "float" else value


class Services:
    """Clients shared by every plan run in one process: one Redis pool per endpoint with its in-flight
    limit, bound to the event loop that first uses them."""

    def __init__(self, env: str | None = None, redis_url: str | None = None):
        self.env, self.redis_url = env or default_env(), redis_url
        self._redis: dict[str, tuple[aioredis.Redis, asyncio.Semaphore, float]] = {}

    async def redis(self, endpoint: str, call: Callable[[aioredis.Redis], Awaitable[Any]]) -> Any:
        """Run one Redis call (or pipeline) on the endpoint, within its in-flight limit and timeout."""
        if endpoint not in self._redis:
            ep = load().endpoint(endpoint, self.env)
            client = aioredis.Redis.from_url(self.redis_url or ep.url, decode_responses=True,
                                             socket_connect_timeout=ep.connect_timeout_ms / 1000,
                                             max_connections=ep.max_inflight)
            self._redis[endpoint] = (client, asyncio.Semaphore(ep.max_inflight), ep.request_timeout_ms / 1000)
        client, limit, timeout = self._redis[endpoint]
        async with limit:
            try:
                async with asyncio.timeout(timeout):
                    return await call(client)
            except TimeoutError:
                raise PlanError(f"redis endpoint {endpoint}: no reply within {timeout * 1000:.0f} ms") from None
            except (RedisError, OSError) as e:
                raise PlanError(f"redis endpoint {endpoint}: {e}") from None

    async def close(self) -> None:
        for client, _, _ in self._redis.values():
            await client.aclose()
        self._redis.clear()


# (model or None for the served one, prompt, sampling params) -> {text, logprob, completion_tokens, ...}
Generate = Callable[[str | None, str | list[dict], dict], Awaitable[dict]]


@dataclass(frozen=True)
class Context:
    request: PlanRequest
    services: Services
    generate: Generate | None = None  # lent by the server for the request's caller
