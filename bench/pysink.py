"""A minimal SMTP sink in pure asyncio: accepts every message and throws it away.

The fallback server of ``bench/run.py`` when Postfix's ``smtp-sink`` is not
installed.  It speaks just enough ESMTP for the clients measured (EHLO with
PIPELINING, 8BITMIME, SIZE; MAIL, RCPT, DATA, RSET, NOOP, QUIT), processes
pipelined commands in order, and checks nothing.  Being Python, it is slower
than ``smtp-sink`` and shares the machine's CPUs with the client, so the
client figures it gives are lower and closer together: use ``smtp-sink`` for
numbers to publish.

    python bench/pysink.py            # prints "PORT n" once listening on 127.0.0.1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

_EHLO = b"250-pysink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 0\r\n250 ENHANCEDSTATUSCODES\r\n"


async def _session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"220 pysink ESMTP\r\n")
    try:
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(_EHLO)
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP", b"HELO"):
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                while (data := await reader.readline()) and data != b".\r\n":
                    pass
                writer.write(b"250 2.0.0 Ok: queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                break
            else:
                writer.write(b"502 5.5.2 Error: command not recognized\r\n")
            if not reader._buffer:  # type: ignore[attr-defined]  # flush once per batch
                await writer.drain()
        await writer.drain()
    except (OSError, asyncio.LimitOverrunError, ValueError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _serve(port: int) -> None:
    server = await asyncio.start_server(_session, "127.0.0.1", port, backlog=256, limit=1 << 20)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    parent = os.getppid()
    async with server:
        while os.getppid() == parent:  # orphaned (the bench died): stop
            await asyncio.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    """Run the sink until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
