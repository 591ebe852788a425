"""A TCP proxy in the test's event loop that can go silent: `freeze()` stops forwarding on
every connection it holds while keeping them open (a dead host, a cut network, a failover
behind a virtual IP), and connections made after it are forwarded again. With a `delay`, each
chunk waits that long before it is forwarded, both ways (a slow network, a loaded host)."""

from __future__ import annotations

import asyncio
import contextlib


class FreezableProxy:
    def __init__(
        self, target_port: int, delay: float = 0.0, hold: dict[bytes, float] | None = None
    ) -> None:
        """`delay`: seconds each chunk waits, both ways; `hold`: pattern -> seconds a chunk
        sent to the server that holds the pattern waits (a script's SHA: its calls reach the
        server late, the others do not)."""
        self.target_port = target_port
        self.delay = delay
        self.hold = hold
        self.port = 0
        self._server: asyncio.Server | None = None
        self._frozen: list[asyncio.Event] = []  # per connection: set = go silent
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> FreezableProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, query: str = "") -> str:
        return f"redis://127.0.0.1:{self.port}/0{query}"

    def freeze(self) -> None:
        """Silence every connection held now (both ways); later ones are forwarded."""
        for frozen in self._frozen:
            frozen.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        frozen = asyncio.Event()
        self._frozen.append(frozen)
        for src, dst, hold in ((reader, up_writer, self.hold), (up_reader, writer, None)):
            task = asyncio.create_task(self._pump(src, dst, frozen, self.delay, hold))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pump(
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        frozen: asyncio.Event,
        delay: float,
        hold: dict[bytes, float] | None,
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                if delay:
                    await asyncio.sleep(delay)
                if hold:
                    await asyncio.sleep(max((s for p, s in hold.items() if p in data), default=0))
                if frozen.is_set():
                    await asyncio.Event().wait()  # (silent: never forwards, never closes)
                dst.write(data)
                await dst.drain()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
