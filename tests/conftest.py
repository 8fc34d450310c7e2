"""Shared fixtures: certificates, SMTP servers to talk to, and PostgreSQL.

=================  =========  ==============================================================
fixture            scope      gives
=================  =========  ==============================================================
``certs``          session    :class:`smtpnotify.testing.CertificateBundle` (trustme CAs,
                              server certificates, PEMs, SHA-256 pins, SSL contexts)
``sink``           function   a running plain :class:`~smtpnotify.testing.SMTPSink`
``make_sink``      function   ``make_sink(**SMTPSink kwargs) -> SMTPSink``, started; all
                              closed after the test
``tls_sink``       function   ``tls_sink(tls="starttls", cert="localhost", **kwargs)``: a
                              started sink with ``ssl_context=certs.server_context(cert)``
``scripted``       function   ``scripted(script=None, *, tls=None, cert=None,
                              ssl_context=None) -> ScriptedServer``, started; all closed
                              (and their thread errors raised) after the test
``postgres_dsn``   session    a reachable DSN, or skip (fail when
                              ``REQUIRE_POSTGRES_TESTS=1``)
=================  =========  ==============================================================

Tests that use ``postgres_dsn`` get the ``postgres`` marker automatically.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import pytest

from scripted_server import Script, ScriptedServer
from smtpnotify.testing import CertificateBundle, ServerCertKind, SMTPSink, make_certificates

DEFAULT_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def certs() -> CertificateBundle:
    """Throw-away CAs and server certificates for the whole session."""
    return make_certificates()


@pytest.fixture
def make_sink() -> Iterator[Callable[..., SMTPSink]]:
    """Factory of started SMTPSinks (``SMTPSink`` keyword arguments), closed after the test."""
    sinks: list[SMTPSink] = []

    def factory(**kwargs: Any) -> SMTPSink:
        sink = SMTPSink(**kwargs).start()
        sinks.append(sink)
        return sink

    yield factory
    for sink in sinks:
        sink.close()


@pytest.fixture
def sink(make_sink: Callable[..., SMTPSink]) -> SMTPSink:
    """A running plain-SMTP sink that accepts everything."""
    return make_sink()


@pytest.fixture
def tls_sink(
    certs: CertificateBundle, make_sink: Callable[..., SMTPSink]
) -> Callable[..., SMTPSink]:
    """Factory of started TLS sinks.

    ``tls_sink()`` offers STARTTLS with the ``"localhost"`` certificate;
    ``tls_sink(tls="ssl", cert="wrong_name", require_starttls=..., auth=...)``
    picks the mode, the certificate kind and any other SMTPSink option.
    """

    def factory(
        tls: Literal["starttls", "ssl"] = "starttls",
        cert: ServerCertKind = "localhost",
        **kwargs: Any,
    ) -> SMTPSink:
        return make_sink(tls=tls, ssl_context=certs.server_context(cert), **kwargs)

    return factory


@pytest.fixture
def scripted(certs: CertificateBundle) -> Iterator[Callable[..., ScriptedServer]]:
    """Factory of started ScriptedServers, closed after the test.

    ``scripted(Script(...))``; ``scripted([first, second])`` for per-connection
    scripts; ``cert="localhost"`` (or any kind) gives it a server context for
    STARTTLS; ``tls="ssl"`` is implicit TLS (``cert`` defaults to
    ``"localhost"`` then); ``ssl_context=`` passes a context of your own.
    """
    servers: list[ScriptedServer] = []

    def factory(
        script: Script | Sequence[Script] | None = None,
        *,
        tls: Literal["none", "ssl"] | None = None,
        cert: ServerCertKind | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> ScriptedServer:
        if ssl_context is None and (cert is not None or tls == "ssl"):
            ssl_context = certs.server_context(cert or "localhost")
        server = ScriptedServer(script, tls=tls, ssl_context=ssl_context).start()
        servers.append(server)
        return server

    yield factory
    errors: list[BaseException] = []
    for server in servers:
        try:
            server.close()
        except RuntimeError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


def _redact_dsn(dsn: str) -> str:
    dsn = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)(\S+)", r"\1***", dsn, flags=re.IGNORECASE)


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """DSN of the test PostgreSQL server.

    ``TEST_POSTGRES_DSN`` or ``postgresql://postgres@127.0.0.1:5432/test``.
    When it cannot be reached (2 s connect timeout) the test is skipped, or
    fails when ``REQUIRE_POSTGRES_TESTS=1``.
    """
    dsn = os.environ.get("TEST_POSTGRES_DSN", DEFAULT_POSTGRES_DSN)
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - psycopg is a dev dependency
        reason = f"psycopg is not installed ({exc})"
    else:
        try:
            with psycopg.connect(dsn, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return dsn
        except psycopg.Error as exc:
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    message = (
        f"PostgreSQL not reachable at {_redact_dsn(dsn)} ({reason}); "
        "set TEST_POSTGRES_DSN to a reachable server"
    )
    if os.environ.get("REQUIRE_POSTGRES_TESTS") == "1":
        pytest.fail(message + " (REQUIRE_POSTGRES_TESTS=1)", pytrace=False)
    pytest.skip(message + " (set REQUIRE_POSTGRES_TESTS=1 to make this a failure)")


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker this file applies (pyproject.toml declares it too)."""
    config.addinivalue_line(
        "markers", "postgres: needs a PostgreSQL server (see the postgres_dsn fixture)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs PostgreSQL with ``postgres``."""
    for item in items:
        if "postgres_dsn" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)


# -- loopback only ------------------------------------------------------------------------
# The suite must never send a packet beyond this machine, not even a DNS query for a name
# in an example.  Every test runs with name resolution and connects limited to loopback.
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def _is_loopback(host: object) -> bool:
    import ipaddress

    if host is None:
        return True
    text = host.decode() if isinstance(host, bytes) else str(host)
    if text.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(text.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_loopback(host):
            raise socket.gaierror(
                socket.EAI_NONAME, f"test suite: no lookups beyond loopback ({host!r})"
            )
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            raise ConnectionRefusedError(
                f"test suite: no connections beyond loopback ({address[0]!r})"
            )
        real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
