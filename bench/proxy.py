"""A TCP proxy on 127.0.0.1 that delays every chunk by a fixed time in each direction.

It models network latency, not bandwidth: each chunk read from one side is
written to the other side ``delay`` seconds after it was read, and chunks keep
their order.  With ``--delay-ms 10`` a request and its reply take 20 ms more
than on loopback, which is a 20 ms round trip.  Pipelined commands (several in
flight at once) each pay the delay once, as on a real network.

Run by ``bench/run.py`` as a child process; also usable on its own::

    python bench/proxy.py --target 127.0.0.1:2525 --delay-ms 10
    PORT 40123                        # printed once listening; Ctrl-C stops it

It only ever listens on, and connects to, 127.0.0.1 (or another loopback
address given as the target).  It exits when its parent process goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
import sys

_CHUNK = 65536


def _loopback(host: str) -> str:
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"proxy: refusing a non-loopback target {host!r}")
    return host


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay`` seconds after it arrived."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read_side() -> None:
        try:
            while chunk := await reader.read(_CHUNK):
                queue.put_nowait((loop.time() + delay, chunk))
        except OSError:
            pass
        queue.put_nowait((loop.time() + delay, b""))

    reading = asyncio.create_task(read_side())
    try:
        while True:
            due, chunk = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not chunk:
                if writer.can_write_eof():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()
    except OSError:
        return
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _serve(target_host: str, target_port: int, delay: float, port: int) -> None:
    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        _nodelay(c_writer)
        try:
            s_reader, s_writer = await asyncio.open_connection(target_host, target_port)
        except OSError:
            c_writer.close()
            return
        _nodelay(s_writer)
        try:
            await asyncio.gather(_pump(c_reader, s_writer, delay), _pump(s_reader, c_writer, delay))
        finally:
            for w in (c_writer, s_writer):
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=256)
    bound = server.sockets[0].getsockname()[1]
    print(f"PORT {bound}", flush=True)
    parent = os.getppid()
    async with server:
        while os.getppid() == parent:  # orphaned (the bench died): stop
            await asyncio.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the proxy until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT on loopback")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="delay each way (ms)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free)")
    args = parser.parse_args(argv)
    host, _, port_text = args.target.rpartition(":")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(_loopback(host), int(port_text), args.delay_ms / 1000.0, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
