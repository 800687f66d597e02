"""`shoal` with a stage that advertises a push address nobody listens on, as one behind NAT would (run as a
script)."""

import socket

from shoal.cli import app
from shoal.worker.peers import PeerServer

listen = PeerServer.start


async def unreachable(self: PeerServer, host: str, port: int = 0) -> str:
    await listen(self, host, port)
    with socket.socket() as s:  # a port that was free a moment ago: connecting to it is refused
        s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"


PeerServer.start = unreachable

if __name__ == "__main__":
    app()
