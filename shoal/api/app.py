import asyncio
import math
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request, Response

from shoal import __version__
from shoal.api import errors, horde, openai, plans, web, workers
from shoal.api.errors import APIError
from shoal.api.metrics import Metrics
from shoal.coordinator.admission import Admission, ApiKeys, AuthError, Limits, RateLimited, Ticket, TooLarge, client_key
from shoal.coordinator.coordinator import Coordinator
from shoal.coordinator.jobs import Job
from shoal.coordinator.workers import WorkerConn
from shoal.plans.runtime import Plans
from shoal.store.ledger import Account, Ledger, job_reward


@dataclass
class Server:
    """Everything a request handler needs, held by the app."""

    coordinator: Coordinator
    admission: Admission = field(default_factory=lambda: Admission(Limits()))
    keys: ApiKeys = field(default_factory=lambda: ApiKeys(set()))
    metrics: Metrics = field(default_factory=Metrics)
    private: bool = False
    worker_tokens: set[str] = field(default_factory=set)  # sha256 of the tokens remote workers present
    ledger: Ledger = field(default_factory=lambda: Ledger("sqlite://"))
    plans: Plans | None = None

    def __post_init__(self) -> None:
        self.coordinator.on_done = self.settle

    async def pay_uptime(self, every_s: float = 600.0) -> None:
        """Forever: every 10 minutes, each online worker with an owner earns uptime kudos, as on the Horde."""
        while True:
            await asyncio.sleep(every_s)
            for worker in list(self.coordinator.catalog.workers.values()):
                if worker.owner_id is None or worker.state != "ONLINE" or self.coordinator.in_maintenance(worker):
                    continue
                info = next(iter(worker.models.values()), {})
                base = 25 + 15 * min(info.get("context", 0), 262_144) / 1024
                params_b = info.get("params_b")
                reward = base * 0.5 if params_b is None else base * max(params_b / 7, 0.25)
                self.ledger.transfer(worker.owner_id, round(reward, 2), "uptime", worker=worker.name)

    def account(self, request: Request) -> Account:
        """The ledger user the request's API key belongs to; anonymous for no key or one the ledger lacks."""
        return self.ledger.account(self.authorize(request)) or self.ledger.account(None)

    def settle(self, job: Job, shares: list[tuple[WorkerConn, float]], done: dict) -> None:
        """Pay the owners of the workers that ran a finished job (one worker, or a route's stages by their share
        of the layers), once ever, and charge its requester."""
        stats = done.get("stats") or {}
        if done["finish_reason"] not in ("stop", "length"):
            return
        sizes = [w.models[job.model].get("params_b") for w, _ in shares]
        known = [w.models[job.model]["params_b"] for w in self.coordinator.catalog.workers.values()
                 if "params_b" in w.models.get(job.model, {})]
        params_b = sum(sizes) if sizes and None not in sizes else (known[0] if known else None)
        reward = job_reward(stats.get("completion_tokens", 0), params_b, 4 * stats.get("prompt_tokens", 0))
        paid, settled = 0.0, False
        for i, (worker, share) in enumerate(shares):
            key = job.id if len(shares) == 1 else f"{job.id}:{i}"
            amount = round(reward * share, 2)
            if worker.owner_id is not None and self.ledger.transfer(worker.owner_id, amount, "reward", job=key,
                                                                    worker=worker.name):
                paid, settled = paid + amount, True
        if not settled:  # no owner to pay, or already paid: nothing to charge either
            return
        job.reward = paid
        if job.user_id:
            self.ledger.transfer(job.user_id, -(paid + 1), "charge", worker=",".join(w.name for w, _ in shares))

    def authorize(self, request: Request) -> str | None:
        """The caller's API key; raises APIError 401 when keys are required and this one is not valid."""
        try:
            return self.keys.check(request.headers.get("authorization"))
        except AuthError as e:
            raise APIError(401, str(e), code="invalid_api_key") from e

    def admit(self, request: Request, tokens: int) -> Ticket:
        """Check the API key and fair use; raises APIError 400, 401 or 429."""
        key = self.authorize(request)
        try:
            return self.admission.admit(client_key(request.client.host if request.client else None, key), tokens)
        except TooLarge as e:
            raise APIError(400, str(e), "max_tokens", "too_many_tokens") from e
        except RateLimited as e:
            self.metrics.rate_limited.labels(e.limit).inc()
            raise APIError(429, str(e), code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, math.ceil(e.retry_after)))}) from e


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="shoal", version=__version__,
                  description="A distributed LLM inference network: OpenAI-compatible API and a web chat page.")
    app.state.server = server
    errors.install(app)
    app.include_router(openai.router)
    app.include_router(web.router)
    app.include_router(workers.router)
    app.include_router(horde.router)
    app.include_router(plans.router)
    app.state.horde = {}

    @app.get("/health", tags=["ops"])
    async def health() -> dict:
        models = server.coordinator.catalog.models()
        return {"status": "ok" if any(m["workers"] for m in models.values()) else "no_workers",
                "models": sorted(models), "time": time.time()}

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics() -> Response:
        return Response(server.metrics.render(server.coordinator), media_type="text/plain; version=0.0.4")

    return app
