"""Child process of ``bench/run.py``: the memory one client needs to send a big attachment.

    python bench/memory_probe.py --client smtplib --port 2525 --mib 20

It imports everything, creates the attachment's bytes (the application holds
them anyway), and then measures what *sending* costs:

* ``growth_mib``: peak resident memory during building and sending the message,
  minus the resident memory just before (Linux: the peak is reset through
  ``/proc/self/clear_refs`` and read as ``VmHWM``; elsewhere ``ru_maxrss``);
* ``peak_mib``: the process's peak resident memory (``ru_maxrss``);
* ``traced_peak_mib``: a second send under ``tracemalloc``, the peak of memory
  allocated by Python during it (objects only: no interpreter or C library
  overhead).

It prints one JSON object.  Each client runs in a fresh process, so one
client's garbage never counts against another.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import smtplib
import sys
import time
import tracemalloc
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clients import (
    BODY,
    LOCAL_HOSTNAME,
    RECIPIENT,
    SENDER,
    mail_config,
)
from servers import Endpoint

from smtpnotify import Attachment, Notification, Notifier

_MIB = 1024 * 1024


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size (VmHWM)
    except OSError:
        return False
    return True


def _maxrss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def _smtplib_email(payload: bytes) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = RECIPIENT
    msg["Subject"] = "Monthly report"
    msg.set_content(BODY)
    msg.add_attachment(
        payload, maintype="application", subtype="octet-stream", filename="report.bin"
    )
    return msg


def sender_for(client: str, endpoint: Endpoint) -> Callable[[bytes], None]:
    """A function that builds and sends one message carrying ``payload``."""
    if client == "smtplib":

        def send_smtplib(payload: bytes) -> None:
            with smtplib.SMTP(endpoint.host, endpoint.port, LOCAL_HOSTNAME, timeout=120) as smtp:
                smtp.send_message(_smtplib_email(payload))

        return send_smtplib
    if client == "aiosmtplib":
        import aiosmtplib

        def send_aiosmtplib(payload: bytes) -> None:
            asyncio.run(
                aiosmtplib.send(
                    _smtplib_email(payload),
                    hostname=endpoint.host,
                    port=endpoint.port,
                    local_hostname=LOCAL_HOSTNAME,
                    use_tls=False,
                    start_tls=False,
                    timeout=120,
                )
            )

        return send_aiosmtplib
    if client == "smtpnotify":
        notifier = Notifier(mail_config(endpoint))

        def send_smtpnotify(payload: bytes) -> None:
            note = Notification(
                RECIPIENT,
                "Monthly report",
                text=BODY,
                attachments=[Attachment("report.bin", payload, "application/octet-stream")],
            )
            notifier.send(note)

        return send_smtpnotify
    raise SystemExit(f"unknown client {client!r}")


def main(argv: list[str] | None = None) -> int:
    """Measure one client; print a JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", required=True, choices=["smtplib", "aiosmtplib", "smtpnotify"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mib", type=float, default=20.0)
    parser.add_argument("--no-tracemalloc", action="store_true", help="skip the traced send")
    args = parser.parse_args(argv)

    send = sender_for(args.client, Endpoint("sink", args.port))
    payload = os.urandom(int(args.mib * _MIB))
    gc.collect()
    before = _status_kib("VmRSS")
    reset = before is not None and _reset_peak()
    before_peak = _maxrss_kib()
    start = time.perf_counter()
    send(payload)
    seconds = time.perf_counter() - start
    hwm = _status_kib("VmHWM") if reset else None
    if before is not None and hwm is not None:
        growth_kib = hwm - before
        method = "VmHWM after clear_refs - VmRSS before"
    else:
        growth_kib = _maxrss_kib() - before_peak
        method = "ru_maxrss after - ru_maxrss before (a lower bound)"
    peak_kib = _maxrss_kib()

    traced_peak: int | None = None
    if not args.no_tracemalloc:
        gc.collect()
        tracemalloc.start()
        send(payload)
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()

    print(
        json.dumps(
            {
                "client": args.client,
                "attachment_mib": args.mib,
                "growth_mib": growth_kib / 1024,
                "peak_mib": peak_kib / 1024,
                "traced_peak_mib": None if traced_peak is None else traced_peak / _MIB,
                "seconds": seconds,
                "method": method,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
