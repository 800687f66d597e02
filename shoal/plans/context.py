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
    user_id: int
    request_id: str
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, body: Any) -> "PlanRequest":
        """From a request object {"user_id", "request_id"?, "param_overrides"?}; every problem is named."""
        if not isinstance(body, dict):
            raise PlanError("a plan request is a JSON object")
        if unknown := set(body) - {"user_id", "request_id", "param_overrides"}:
            raise PlanError(f"unknown request field(s): {', '.join(sorted(unknown))}")
        if "user_id" not in body:
            raise PlanError("missing required field: user_id")
        user = body["user_id"]
        if isinstance(user, str) and user.isdigit():
            user = int(user)
        if isinstance(user, bool) or not isinstance(user, int) or not 1 <= user <= MAX_USER_ID:
            raise PlanError(f"user_id must be an integer from 1 to {MAX_USER_ID}, got {body['user_id']!r}")
        request_id = body.get("request_id") or uuid.uuid4().hex
        if not isinstance(request_id, str):
            raise PlanError(f"request_id must be a string, got {request_id!r}")
        overrides = body.get("param_overrides") or {}
        if not isinstance(overrides, dict):
            raise PlanError("param_overrides must be an object")
        return cls(user, request_id, {name: _param(name, value) for name, value in overrides.items()})


def _param(name: str, value: Any) -> Any:
    spec = load().param(name)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if value is not None and not (number if spec.type in ("float", "int") else isinstance(value, str)):
        raise PlanError(f"param {name} must be a {spec.type} or null, got {value!r}")
    return float(value) if number and spec.type == "float" else value


class Services:
    """Clients shared by every plan run in one process: one Redis pool per endpoint, its in-flight limit,
    and the LLM generator the coordinator lends. Bound to the event loop that first uses them."""

    def __init__(self, env: str | None = None, redis_url: str | None = None,
                 generate: Callable[..., Awaitable[Any]] | None = None):
        self.env, self.redis_url, self.generate = env or default_env(), redis_url, generate
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
                return await asyncio.wait_for(call(client), timeout)
            except TimeoutError:
                raise PlanError(f"redis endpoint {endpoint}: no reply within {timeout * 1000:.0f} ms") from None
            except (RedisError, OSError) as e:
                raise PlanError(f"redis endpoint {endpoint}: {e}") from None

    async def close(self) -> None:
        for client, _, _ in self._redis.values():
            await client.aclose()
        self._redis.clear()


@dataclass(frozen=True)
class Context:
    request: PlanRequest
    services: Services
