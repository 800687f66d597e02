"""Stage-to-stage pushes, in process: two StageServers of the demo model, the second listening for pushes."""

import asyncio

import pytest
from conftest import free_port

from shoal.coordinator.pipeline import ints
from shoal.engine.stage import StageEngine
from shoal.model import DEMO_PATH
from shoal.worker.channel import Message
from shoal.worker.peers import Peers, PeerServer
from shoal.worker.stages import StageServer

PROMPT = [1, 5, 9, 12]


class Stage:
    """A StageServer whose messages to the coordinator land in a queue."""

    def __init__(self, layers: tuple[int, int]):
        self.engine = StageEngine.from_dir(DEMO_PATH, layers)
        self.layers = layers
        self.out: asyncio.Queue[Message] = asyncio.Queue()
        self.server = StageServer(self.engine, self.out.put)

    async def open(self, session: str, secret: str | None = None) -> None:
        self.server.handle({"type": "stage_open", "session": session, "layers": list(self.layers), "prompt": PROMPT,
                            "params": {"temperature": 0.0} if self.layers[1] == 4 else None, "push_secret": secret})
        assert (await self.reply())["type"] == "stage_ready"

    async def reply(self, timeout: float = 10.0) -> Message:
        return await asyncio.wait_for(self.out.get(), timeout)

    def close(self) -> None:
        self.engine.close()


def step(session: str, position: int, inputs: dict, **extra) -> Message:
    return {"type": "stage_in", "session": session, "step": position, "position": position, **inputs, **extra}


def run(test) -> None:
    async def main() -> None:
        first, last = Stage((0, 1)), Stage((1, 4))
        try:
            await test(first, last)
        finally:
            await first.server.peers.close()
            first.close()
            last.close()
    asyncio.run(main())


def test_a_pushed_step_is_answered_by_the_next_hop_as_a_relayed_one_is():
    async def test(first: Stage, last: Stage) -> None:
        listener = PeerServer(last.server.accept_push)
        address = await listener.start("127.0.0.1")
        try:
            await first.open("a")
            await last.open("b", "s3cret")
            route = [{"peer": address, "session": "b", "secret": "s3cret", "sample": True}]
            first.server.handle(step("a", 0, ints(PROMPT), route=route))
            hidden = await first.reply()
            assert hidden["type"] == "stage_out" and hidden["pushed"] is True
            pushed = await last.reply()
            await last.open("c")  # the same step relayed to a session of its own
            last.server.handle(step("c", 0, {k: hidden[k] for k in ("dtype", "shape", "data")}, sample=True))
            relayed = await last.reply()
            assert pushed["type"] == "stage_out" and pushed["token"] == relayed["token"]
        finally:
            listener.close()
    run(test)


def test_a_push_without_the_sessions_secret_is_dropped():
    async def test(first: Stage, last: Stage) -> None:
        await first.open("a")
        await last.open("b", "s3cret")
        first.server.handle(step("a", 0, ints(PROMPT)))
        reply = await first.reply()
        hidden = {k: reply[k] for k in ("dtype", "shape", "data")}
        for secret in ("wrong", None, "sécret"):
            last.server.accept_push(step("b", 0, hidden, sample=True, secret=secret))
        last.server.accept_push(step(["b"], 0, hidden, sample=True, secret="s3cret"))  # not a session id at all
        with pytest.raises(TimeoutError):
            await last.reply(timeout=0.5)
        last.server.accept_push(step("b", 0, hidden, sample=True, secret="s3cret"))
        assert "token" in await last.reply()
    run(test)


def test_a_step_that_arrives_twice_is_taken_once():
    async def test(first: Stage, last: Stage) -> None:
        await first.open("a")
        first.server.handle(step("a", 0, ints(PROMPT)))
        first.server.handle(step("a", 0, ints(PROMPT)))  # pushed, then relayed by a coordinator that doubted the push
        assert (await first.reply())["type"] == "stage_out"
        with pytest.raises(TimeoutError):
            await first.reply(timeout=0.5)
        first.server.handle(step("a", 4, ints([7])))
        assert (await first.reply())["type"] == "stage_out"
    run(test)


def test_a_push_nobody_takes_is_reported_so_the_coordinator_relays():
    async def test(first: Stage, last: Stage) -> None:
        await first.open("a")
        route = [{"peer": f"127.0.0.1:{free_port()}", "session": "b", "secret": "x", "sample": True}]
        first.server.handle(step("a", 0, ints(PROMPT), route=route))
        reply = await first.reply()
        assert reply["type"] == "stage_out" and reply["pushed"] is False and reply["shape"] == [len(PROMPT), 256]
    run(test)


def test_peers_report_a_failed_push_and_try_again_after_a_backoff():
    async def main() -> None:
        got: list[Message] = []
        port = free_port()
        peers = Peers(backoff_s=0.3)
        assert not await peers.push(f"127.0.0.1:{port}", {"type": "stage_in", "data": b"x"})
        listener = PeerServer(got.append)
        await listener.start("127.0.0.1", port)
        try:
            assert not await peers.push(f"127.0.0.1:{port}", {"type": "stage_in", "data": b"x"})  # not tried yet
            await asyncio.sleep(0.35)
            assert await peers.push(f"127.0.0.1:{port}", {"type": "stage_in", "session": "s", "data": b"xy"})
            for _ in range(100):
                if got:
                    break
                await asyncio.sleep(0.01)
            assert got == [{"type": "stage_in", "session": "s", "data": b"xy"}]
        finally:
            listener.close()
            await peers.close()
    asyncio.run(main())
