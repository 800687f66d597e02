import time
from dataclasses import dataclass, field

from shoal.worker.channel import Message, Transport


@dataclass(eq=False)
class WorkerConn:
    """A connected worker as the coordinator sees it: what it holds, how many jobs it will take now.

    A Horde-style worker that polls over HTTP instead of holding a connection has no channel.
    """

    id: str
    name: str
    channel: Transport | None
    models: dict[str, dict]
    slots: int
    credit: int = 0
    jobs: set[str] = field(default_factory=set)
    snapshot: dict = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)
    state: str = "JOINING"
    owner_id: int | None = None
    credit_at: float = 0.0
    rtt_ms: float = 1.0  # round trip of a route step that computes nothing (stage_open), averaged
    step_ms: float = 0.0  # what the worker says a route step took it, averaged
    speed: float = 10.0  # one sequence's decode tokens/s as the worker measured it (a guess for a polling one)
    peer: str | None = None  # host:port where a stage takes pushes from the previous hop of a route


    @classmethod
    def from_hello(cls, worker_id: str, channel: Transport, hello: Message, owner_id: int | None) -> "WorkerConn":
        models = {m["name"]: m for m in hello["models"]}
        peer = hello.get("peer")
        return cls(worker_id, hello["name"], channel, models, hello["slots"], owner_id=owner_id,
                   speed=max(0.1, float(hello.get("tokens_per_s") or 10.0)),
                   peer=peer if isinstance(peer, str) else None)


class Catalog:
    """The models the network can serve right now, from what connected workers advertise."""

    def __init__(self) -> None:
        self.workers: dict[str, WorkerConn] = {}

    def add(self, worker: WorkerConn) -> None:
        self.workers[worker.id] = worker

    def remove(self, worker_id: str) -> WorkerConn | None:
        return self.workers.pop(worker_id, None)

    def models(self) -> dict[str, dict]:
        """Model name -> its advertised facts (context length), how many workers serve it whole and how many
        serve a range of its layers as pipeline stages."""
        out: dict[str, dict] = {}
        for worker in self.workers.values():
            for name, info in worker.models.items():
                whole = info["layers"] == [0, info["n_layers"]] and info.get("ms_per_layer") is None
                entry = out.setdefault(name, {"context": info["context"], "workers": 0, "stages": 0})
                entry["workers"] += whole and worker.state == "ONLINE"
                entry["stages"] += not whole and worker.state == "ONLINE"
        return out

    def with_credit(self) -> list[WorkerConn]:
        """Workers that can start a job now, the fastest first (tokens/s from their heartbeats)."""
        ready = [w for w in self.workers.values() if w.credit > 0 and w.state == "ONLINE"]
        return sorted(ready, key=lambda w: -w.snapshot.get("tokens_per_s", 0.0))
