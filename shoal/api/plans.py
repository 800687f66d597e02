"""The plan API: run a compiled plan (seed 004) as one request, `POST /v1/plans/{name}`."""

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from shoal.api.errors import APIError
from shoal.api.schemas import SamplingFields
from shoal.coordinator.coordinator import ModelNotFound, NoCapacity, TooLong
from shoal.plans.registry import PlanError
from shoal.plans.runtime import Plans, names
from shoal.plans.scheduler import NODE_TIMEOUT, REQUEST_DEADLINE, NodeError

router = APIRouter(tags=["plans"])
SAMPLING = set(SamplingFields(model="").engine_params(None)) - {"logprobs"}  # what a job takes


class Generator:
    """`generate` for one caller's plan: each call is a job in the coordinator's queue, charged to the caller;
    counts the tokens of every call, so usage covers the samples a plan then drops."""

    def __init__(self, server: Any, user_id: int, kudos: float, model: str | None = None):
        self.server, self.user_id, self.kudos, self.model = server, user_id, kudos, model
        self.prompt_tokens = self.completion_tokens = 0

    async def __call__(self, model: str | None, prompt: str | list[dict], params: dict) -> dict:
        if unknown := set(params) - SAMPLING:
            raise PlanError(f"generate: unknown sampling param(s) {sorted(unknown)}")
        coordinator = self.server.coordinator
        try:
            job = await coordinator.submit(self._model(model), prompt, {**params, "logprobs": 0}, None, 0,
                                           self.user_id, self.kudos)
        except (ModelNotFound, NoCapacity, TooLong) as e:
            raise PlanError(f"generate: {e}") from None
        text, logprobs, done = [], [], {}
        try:
            async for msg in job:
                if msg["type"] == "done":
                    done = msg
                    continue
                text += [msg["text"]] if msg["kind"] == "text" else []
                logprobs += [e["logprob"] for e in msg.get("logprobs") or []]
        finally:
            await coordinator.cancel(job)
        if done.get("finish_reason") in (None, "error", "cancelled"):
            raise PlanError(f"generate: {done.get('error') or 'the generation did not finish'}")
        stats = done.get("stats") or {}
        self.prompt_tokens = stats.get("prompt_tokens", 0)
        self.completion_tokens += stats.get("completion_tokens", len(logprobs))
        return {"text": "".join(text), "logprob": sum(logprobs) / len(logprobs) if logprobs else None,
                "completion_tokens": stats.get("completion_tokens", len(logprobs)),
                "prompt_tokens": stats.get("prompt_tokens"), "finish_reason": done["finish_reason"]}

    def _model(self, model: str | None) -> str:
        served = sorted(self.server.coordinator.catalog.models())
        if model or self.model:
            return model or self.model
        if len(served) != 1:
            raise PlanError(f"generate: name a model (served: {', '.join(served) or 'none'})")
        return served[0]


def _plans(request: Request) -> Plans:
    plans = request.app.state.server.plans
    if plans is None:
        raise APIError(404, "this server runs no plans (start it with --plan-dir)", code="plans_disabled")
    return plans


@router.get("/v1/plans")
async def list_plans(request: Request) -> dict:
    request.app.state.server.authorize(request)
    return {"plans": names(_plans(request).directory)}


@router.post("/v1/plans/{name}")
async def run_plan(name: str, request: Request) -> JSONResponse:
    """Body: {"user_id", "request_id"?, "param_overrides"?, "deadline_ms"?, "node_timeout_ms"?}. Answers
    {"request_id", "candidates"}, or {"error"}: 504 for a deadline, 502 for a failed node."""
    server, plans = request.app.state.server, _plans(request)
    try:
        body = await request.json()
    except ValueError:
        raise APIError(400, "the body is not JSON", code="invalid_json") from None
    limits = {k: body.pop(k) for k in ("deadline_ms", "node_timeout_ms") if isinstance(body, dict) and k in body}
    if any(not isinstance(v, int | float) or isinstance(v, bool) for v in limits.values()):
        raise APIError(400, f"deadline_ms and node_timeout_ms are numbers, got {limits}", code="invalid_value")
    ticket = server.admit(request, 0)
    account = server.account(request)
    started = time.perf_counter()
    try:
        result = await plans.run(name, body, limits.get("deadline_ms"), limits.get("node_timeout_ms"),
                                 Generator(server, account.id, account.kudos))
    except LookupError as e:
        raise APIError(404, str(e).strip("'\""), "name", "plan_not_found") from None
    except PlanError as e:
        raise APIError(400, str(e), code="invalid_plan_request") from None
    except NodeError as e:
        server.metrics.plan_runs.labels("error").inc()
        return JSONResponse({"error": str(e)}, status_code=504 if str(e) in (NODE_TIMEOUT, REQUEST_DEADLINE) else 502)
    finally:
        ticket.release(0)
    server.metrics.plan_runs.labels("ok").inc()
    server.metrics.plan_latency.observe(time.perf_counter() - started)
    return JSONResponse(result)
