"""The plan API: run a compiled plan (seed 004) as one request, `POST /v1/plans/{name}`."""

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from shoal.api.errors import APIError
from shoal.plans.registry import PlanError
from shoal.plans.runtime import Plans, names
from shoal.plans.scheduler import NODE_TIMEOUT, REQUEST_DEADLINE, NodeError

router = APIRouter(tags=["plans"])


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
    started = time.perf_counter()
    try:
        result = await plans.run(name, body, limits.get("deadline_ms"), limits.get("node_timeout_ms"))
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
