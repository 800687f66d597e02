"""`shoal serve`: the coordinator and one in-process worker behind the HTTP API."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from shoal import logs
from shoal.api.app import Server, create_app
from shoal.coordinator.admission import Admission, ApiKeys, Limits
from shoal.coordinator.coordinator import Coordinator
from shoal.engine import EngineConfig
from shoal.engine.process import EngineProcess
from shoal.model import DEMO_PATH
from shoal.model.weights import weights_fingerprint
from shoal.plans.context import Services
from shoal.plans.runtime import Plans, default_dir
from shoal.store.ledger import Ledger, digest
from shoal.worker.agent import WorkerAgent
from shoal.worker.channel import channel_pair

log = logging.getLogger("shoal.serve")


@dataclass
class ServeSettings:
    model: Path = DEMO_PATH
    model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: Limits = field(default_factory=Limits)
    api_keys: list[str] = field(default_factory=list)
    api_keys_file: Path | None = None
    private: bool = False
    local_worker: bool = True
    worker_tokens: list[str] = field(default_factory=list)
    db: str = "sqlite:///shoal.db"
    verify_rate: float = 0.0
    plan_dir: Path = field(default_factory=default_dir)
    redis_url: str | None = None

    @property
    def name(self) -> str:
        return self.model_name or Path(self.model).resolve().name


def build_app(settings: ServeSettings, engine: EngineProcess | None = None) -> FastAPI:
    """The app; on startup it connects the engine, when given, as a worker."""
    keys = ApiKeys.load(settings.api_keys, settings.api_keys_file)
    # Private mode writes nothing of a request to disk, the ledger's job rows included.
    ledger = Ledger("sqlite://" if settings.private else settings.db)
    server = Server(Coordinator(verify_rate=settings.verify_rate), Admission(settings.limits), keys,
                    private=settings.private,
                    worker_tokens={digest(t) for t in settings.worker_tokens}, ledger=ledger)
    services = Services(redis_url=settings.redis_url)
    server.plans = Plans(settings.plan_dir, services, on_late=server.metrics.plan_late.inc)
    app = create_app(server)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(server.coordinator.watch()), asyncio.create_task(server.pay_uptime())]
        if engine is not None:
            worker_end, coordinator_end = channel_pair()
            tasks += [asyncio.create_task(WorkerAgent(engine, settings.name, worker_end,
                                                                fingerprint=weights_fingerprint(settings.model)).run()),
                      asyncio.create_task(server.coordinator.attach(coordinator_end))]
            while not server.coordinator.catalog.models().get(settings.name, {}).get("workers"):
                await asyncio.sleep(0.01)
            log.info("serving", extra={"model": settings.name})
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await server.plans.close()
            if engine is not None:
                await asyncio.to_thread(engine.close)

    app.router.lifespan_context = lifespan
    return app


def serve(settings: ServeSettings, threads: int | None = None) -> None:
    """Load the model first, so that a bad model directory fails here with its own message. The local worker's
    engine runs in a process of its own (`threads` math threads), off the HTTP server's GIL."""
    logs.configure()
    engine = EngineProcess(settings.model, settings.engine, threads) if settings.local_worker else None
    # websockets-sansio: the workers' connections, a route step's two crossings among them, take a third less
    # time per message than with uvicorn's default WebSocket protocol.
    uvicorn.run(build_app(settings, engine), host=settings.host, port=settings.port,
                access_log=not settings.private, log_level="info", ws="websockets-sansio")
