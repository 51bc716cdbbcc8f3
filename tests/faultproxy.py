"""A TCP proxy that injects faults: a delay on every chunk it forwards,
connections cut at random, and (optionally) a byte flipped in a chunk past
the first ``intact`` bytes of a connection. Runs its own event loop in a
thread."""
from __future__ import annotations

import asyncio
import random
import threading
from typing import Optional


class FaultProxy:
    def __init__(self, target_port: int, delay: float = 0.005, drop: float = 0.02, seed: int = 1,
                 corrupt: float = 0.0, intact: int = 4096) -> None:
        self.target_port, self.delay, self.drop = target_port, delay, drop
        self.corrupt, self.intact = corrupt, intact
        self.rnd = random.Random(seed)
        self.cuts = 0
        self.corrupted = 0
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: Optional[asyncio.AbstractServer] = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._server = self.loop.run_until_complete(asyncio.start_server(self._conn, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()
        # stopped: close every connection before the loop goes away
        self._server.close()
        tasks = asyncio.all_tasks(self.loop)
        for t in tasks:
            t.cancel()
        self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.run_until_complete(self._server.wait_closed())
        self.loop.close()

    def heal(self) -> None:
        self.delay, self.drop, self.corrupt = 0.0, 0.0, 0.0

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, peer: asyncio.StreamWriter) -> None:
        passed = 0
        try:
            while True:
                data = await r.read(4096)
                if not data:
                    break
                passed += len(data)
                if self.corrupt and passed > self.intact and self.rnd.random() < self.corrupt:
                    i = self.rnd.randrange(len(data))
                    data = data[:i] + bytes([data[i] ^ 0x20]) + data[i + 1:]
                    self.corrupted += 1
                if self.delay:
                    await asyncio.sleep(self.rnd.uniform(0, self.delay))
                if self.drop and self.rnd.random() < self.drop:
                    self.cuts += 1
                    break
                w.write(data)
                await w.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            w.close()
            peer.close()
            try:
                await w.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            tr, tw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            w.close()
            return
        await asyncio.gather(self._pipe(r, tw, w), self._pipe(tr, w, tw))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
