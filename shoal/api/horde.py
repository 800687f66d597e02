"""The AI Horde v2 text API, wire-compatible: clients submit and poll, Horde-style workers pop and submit.

Both sides map onto the coordinator's one queue, so a Horde client's job may run on a shoal worker and
a Horde worker may serve a job that came in through this API.
"""

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from shoal import __version__
from shoal.api.errors import HordeError
from shoal.coordinator.admission import RateLimited, client_key
from shoal.coordinator.coordinator import Coordinator, ModelNotFound, NoCapacity, TooLong
from shoal.coordinator.jobs import Job
from shoal.coordinator.workers import WorkerConn
from shoal.store.ledger import Account, Ledger, upfront_kudos

router = APIRouter(prefix="/api/v2", tags=["horde"])
JOB_TTL_S = 150.0
EXPIRY_S = 20 * 60.0


class Params(BaseModel):
    model_config = ConfigDict(extra="ignore")

    n: int = Field(1, ge=1, le=20)
    max_length: int = Field(80, ge=16, le=4096)
    max_context_length: int = Field(2048, ge=80, le=1_048_576)
    temperature: float = Field(0.7, ge=0, le=5)
    top_p: float = Field(1.0, ge=0.001, le=1)
    top_k: int = Field(0, ge=0, le=200)
    min_p: float = Field(0.0, ge=0, le=1)
    rep_pen: float = Field(1.0, ge=1, le=3)
    stop_sequence: list[str] = Field(default_factory=list, max_length=128)


class AsyncRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str
    params: Params = Field(default_factory=Params)
    models: list[str] = Field(default_factory=list)
    dry_run: bool = False
    allow_downgrade: bool = False


class PopRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=100)
    models: list[str] = Field(min_length=1)
    max_length: int = Field(512, ge=1)
    max_context_length: int = Field(2048, ge=1)
    amount: int = Field(1, ge=1, le=20)


class SubmitRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    generation: str
    state: str = Field("ok", pattern="^(ok|censored|faulted|csam)$")
    seed: int = 0


@dataclass
class WaitingPrompt:
    id: str
    model: str
    jobs: list[Job]
    created: float = field(default_factory=time.time)
    generations: list[dict] = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)
    finished: asyncio.Future | None = None


def _account(request: Request, apikey: str | None) -> Account:
    if not apikey:
        raise HordeError(400, "Missing apikey header", "MissingApiKey")
    account = request.app.state.server.ledger.account(apikey)
    if account is None:
        raise HordeError(401, "No user matching sent API Key. Have you remembered to register at https://aihorde.net"
                              "/register ?", "InvalidAPIKey")
    return account


def _uuid(value: str, dashed: bool = True) -> str:
    """Ids go out in the Horde's dashed UUID form; either form comes back in."""
    try:
        return str(uuid.UUID(value)) if dashed else uuid.UUID(value).hex
    except ValueError:
        return value


def _board(request: Request) -> dict[str, WaitingPrompt]:
    board = request.app.state.horde
    for wp_id in [k for k, wp in board.items() if time.time() - wp.created > EXPIRY_S]:
        del board[wp_id]
    return board


@router.post("/generate/text/async", status_code=202, response_model=None)
async def generate_async(body: AsyncRequest, request: Request,
                         apikey: str | None = Header(None)) -> dict | JSONResponse:
    server, user = request.app.state.server, _account(request, apikey)
    p = body.params
    if not body.prompt:
        raise HordeError(400, "You cannot specify an empty prompt.", "MissingPrompt")
    if p.max_context_length < p.max_length:
        raise HordeError(400, "Your max_context_length cannot be less than your max_length", "TokenOverflow")
    available = server.coordinator.catalog.models()
    model = next((m for m in body.models or sorted(available) if m in available), None)
    if model is None:
        raise HordeError(400, f"No workers serve any of {body.models or 'your models'}", "NoValidWorkers")
    if body.dry_run:
        return JSONResponse({"kudos": round((p.max_length / 125 + 1) * p.n + 1, 2)}, status_code=200)
    upfront = _upfront(server.coordinator, server.ledger, model, body, user)
    try:
        ticket = server.admission.admit(client_key(request.client.host if request.client else None,
                                                   apikey if user.id else None), p.n * p.max_length)
    except RateLimited as e:
        raise HordeError(429, str(e), "TooManyPrompts") from e
    params = {"max_tokens": p.max_length, "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
              "min_p": p.min_p, "repetition_penalty": p.rep_pen, "stop": p.stop_sequence}
    try:
        jobs = [await server.coordinator.submit(model, body.prompt, params, user_id=user.id, kudos=user.kudos)
                for _ in range(p.n)]
    except (ModelNotFound, NoCapacity, TooLong) as e:
        ticket.release(0)
        if upfront:
            server.ledger.transfer(user.id, upfront, "upfront_return")
        rc = "TokenOverflow" if isinstance(e, TooLong) else "NoValidWorkers"
        raise HordeError(400, str(e), rc) from e
    wp = WaitingPrompt(str(uuid.uuid4()), model, jobs)
    wp.tasks = [asyncio.create_task(_collect(wp, job)) for job in jobs]
    wp.finished = asyncio.gather(*wp.tasks)
    wp.finished.add_done_callback(lambda _: ticket.release())
    if upfront:  # the reserve goes back when the jobs end; each finished job is charged on its own
        wp.finished.add_done_callback(lambda _: server.ledger.transfer(user.id, upfront, "upfront_return"))
    _board(request)[wp.id] = wp
    return {"id": wp.id, "kudos": 0}


def _serving(coordinator: Coordinator, model: str) -> list[WorkerConn]:
    return [w for w in coordinator.catalog.workers.values() if w.state == "ONLINE" and model in w.models]


def _upfront(coordinator: Coordinator, ledger: Ledger, model: str, body: AsyncRequest, user: Account) -> float:
    """Reserve the upfront kudos a large request needs and return the amount; with allow_downgrade, a user who
    cannot pay gets max_length cut to the threshold instead of a 403, as on the Horde."""
    workers = _serving(coordinator, model)
    threads = sum(w.slots for w in workers)
    threshold = min(512, max(256, 512 + 5 * threads - round(0.9 * len(coordinator.queue))))
    p = body.params
    if p.max_length <= threshold:
        return 0.0
    sizes = [w.models[model]["params_b"] for w in workers if "params_b" in w.models[model]]
    amount = upfront_kudos(p.max_length, max(sizes, default=None), p.n)
    if user.id and user.kudos >= amount:
        ledger.transfer(user.id, -amount, "upfront")
        return amount
    if body.allow_downgrade:
        p.max_length = threshold
        return 0.0
    raise HordeError(403, f"This request requires {amount} kudos upfront (max_length {p.max_length} is over "
                          f"{threshold}); you have {user.kudos}. Lower max_length or set allow_downgrade.",
                     "KudosUpfront")


async def _collect(wp: WaitingPrompt, job: Job) -> None:
    text = [m["text"] async for m in job if m["type"] == "tokens" and m["kind"] == "text"]
    if job.result and job.result["finish_reason"] in ("stop", "length"):
        text.append((job.result.get("stats") or {}).get("stop_sequence") or "")  # the Horde returns it
        wp.generations.append({"text": "".join(text), "seed": job.params.get("seed", 0), "worker_id": job.worker,
                               "worker_name": job.worker_name, "model": wp.model, "state": "ok",
                               "gen_metadata": []})


def _status(request: Request, wp: WaitingPrompt) -> dict:
    coordinator = request.app.state.server.coordinator
    states = [job.state for job in wp.jobs]
    waiting = sum(s in ("RECEIVED", "QUEUED") for s in states)
    processing = sum(s in ("SCHEDULED", "ACTIVE") for s in states)
    queued = coordinator.queue.ordered()
    position = next((i + 1 for i, job in enumerate(queued) if job in wp.jobs), 0)
    return {"finished": len(wp.generations), "processing": processing, "restarted": sum(j.retries for j in wp.jobs),
            "waiting": waiting, "done": waiting + processing == 0, "faulted": "FAILED" in states,
            "wait_time": _wait_time(coordinator, wp, queued), "queue_position": position, "kudos": 0.0,
            "is_possible": bool(coordinator.catalog.models().get(wp.model, {}).get("workers")) or processing > 0,
            "generations": wp.generations}


def _wait_time(coordinator: Coordinator, wp: WaitingPrompt, queued: list[Job]) -> int:
    """Seconds until done, as the Horde estimates it: the tokens queued up to this request's jobs over the
    pool's speed, plus the longest time left among its jobs in flight."""
    workers = _serving(coordinator, wp.model)
    speed = sum(w.speed for w in workers) / len(workers) if workers else 1.0
    ahead = queued[:max((i + 1 for i, job in enumerate(queued) if job in wp.jobs), default=0)]
    tokens = sum(job.params.get("max_tokens") or 0 for job in ahead)
    threads = max(1, min(sum(w.slots for w in workers), len(ahead)))
    running = [(job.params.get("max_tokens") or 0) - job.sent_tokens for job in wp.jobs if job.state in
               ("SCHEDULED", "ACTIVE")]
    return round(tokens / (speed * threads) + max(running, default=0) / speed)


def _find(request: Request, wp_id: str) -> WaitingPrompt:
    wp = _board(request).get(_uuid(wp_id))
    if wp is None:
        raise HordeError(404, f"Request with ID '{wp_id}' not found.", "RequestNotFound")
    return wp


@router.get("/generate/text/status/{wp_id}")
async def status(wp_id: str, request: Request) -> dict:
    return _status(request, _find(request, wp_id))


@router.delete("/generate/text/status/{wp_id}")
async def cancel(wp_id: str, request: Request) -> dict:
    wp = _find(request, wp_id)
    body = _status(request, wp)
    for job in wp.jobs:
        await request.app.state.server.coordinator.cancel(job)
    return body


@router.post("/generate/text/pop")
async def pop(body: PopRequest, request: Request, apikey: str | None = Header(None)) -> dict:
    coordinator, user = request.app.state.server.coordinator, _account(request, apikey)
    if user.id == 0:
        raise HordeError(403, "Anonymous is not allowed to run workers", "AnonForbiddenWorker")
    named = next((w for w in coordinator.catalog.workers.values() if w.name == body.name), None)
    if named is not None and named.owner_id != user.id:
        raise HordeError(403, f"Worker {body.name!r} belongs to another user", "WrongCredentials")
    worker = coordinator.pull_worker(body.name, body.models, user.id, body.max_context_length)
    jobs = [job for _ in range(body.amount) if (job := coordinator.pop(worker, body.max_length, JOB_TTL_S))]
    if not jobs:
        return {"id": None, "ids": [], "payload": {}, "skipped": {}, "messages": [], "model": None, "ttl": JOB_TTL_S}
    p = jobs[0].params
    payload = {"prompt": jobs[0].prompt, "n": 1, "max_length": p.get("max_tokens") or body.max_length,
               "max_context_length": body.max_context_length, "temperature": p.get("temperature", 0.7),
               "top_p": p.get("top_p", 1.0), "top_k": p.get("top_k", 0), "min_p": p.get("min_p", 0.0),
               "rep_pen": p.get("repetition_penalty", 1.0), "stop_sequence": p.get("stop") or []}
    return {"id": _uuid(jobs[0].id), "ids": [_uuid(j.id) for j in jobs], "payload": payload, "model": jobs[0].model,
            "ttl": JOB_TTL_S, "skipped": {}, "messages": [], "softprompt": None}


@router.post("/generate/text/submit")
async def submit(body: SubmitRequest, request: Request, apikey: str | None = Header(None)) -> dict:
    coordinator, user = request.app.state.server.coordinator, _account(request, apikey)
    job_id = _uuid(body.id, dashed=False)
    job = coordinator.jobs.get(job_id)
    worker = coordinator.catalog.workers.get(job.worker or "") if job else None
    if worker is not None and worker.owner_id != user.id:
        raise HordeError(403, "This job was popped by another user's worker", "WrongCredentials")
    try:
        done = await coordinator.complete(worker, job_id, body.generation.replace("\0", "\ufffd"),
                                          body.state == "faulted")
    except KeyError as e:
        raise HordeError(404, f"Processing Generation with ID {body.id} does not exist.", "InvalidJobID") from e
    except ValueError as e:
        raise HordeError(400, f"Processing Generation with ID {body.id} cannot take a result ({e}).", str(e)) from e
    return {"reward": 0.0 if body.state == "faulted" else done.reward}


@router.get("/find_user")
async def find_user(request: Request, apikey: str | None = Header(None)) -> dict:
    account = request.app.state.server.ledger.account(apikey) if apikey else None
    if account is None:
        raise HordeError(404, "User not found", "UserNotFound")
    return {"username": f"{account.name}#{account.id}", "id": account.id, "kudos": account.kudos,
            "concurrency": 30, "worker_ids": [], "worker_count": 0}


@router.get("/status/models")
async def models(request: Request, type: str = "image") -> list[dict]:
    coordinator = request.app.state.server.coordinator
    if type != "text":
        return []
    queued = coordinator.queue.ordered()
    return [{"name": name, "count": info["workers"], "performance": 0.0, "type": "text", "eta": 0,
             "queued": sum(j.params.get("max_tokens") or 0 for j in queued if j.model == name),
             "jobs": sum(j.model == name for j in queued)}
            for name, info in sorted(coordinator.catalog.models().items())]


@router.get("/status/heartbeat")
async def heartbeat() -> dict:
    return {"message": "OK", "version": __version__}
