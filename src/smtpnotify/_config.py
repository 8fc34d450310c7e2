"""`MailConfig`: the validated, immutable settings of a `Notifier` (SPEC §1).

Everything that can be checked without touching the network is checked here,
when the config is built: a bad value raises `pydantic.ValidationError`
naming the field and the rule, and never echoing the password.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    SecretStr,
    SerializationInfo,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from ._config_errors import _MASK, _combination_error, _redacted
from ._config_parsing import (
    _duration,
    _has_line_or_control,
    _has_space_or_control,
    _ip,
    _normalise_fingerprint,
    _not_bool,
    _parse_sender,
    _split_certificates,
)
from ._config_parsing import _is_loopback as _is_loopback  # re-exported: testing.strategies
from ._config_sources import _env_settings, _file_settings

__all__ = ["MailConfig"]

_DEFAULT_PORTS = {"none": 25, "starttls": 587, "ssl": 465}

_Seconds = Annotated[float, BeforeValidator(_not_bool), Field(ge=1, le=300, allow_inf_nan=False)]
_Duration = Annotated[timedelta, BeforeValidator(_duration)]


# --------------------------------------------------------------------------- the model


class MailConfig(BaseModel):
    """Where and how to hand notification mail over, and how long to keep retrying.

    An immutable, validated value (frozen pydantic model, unknown fields
    rejected).  Only ``sender`` is required::

        MailConfig(sender="app@example.com")
            # the local MTA: localhost:25, no TLS, no AUTH
        MailConfig(sender="Change Desk <noreply@example.com>", host="smtp.example.com",
                   tls="starttls", username="app", password="s3cret")
            # port 587; STARTTLS is required (no plaintext fallback), then AUTH
        MailConfig(sender="app@example.com", host="smtp.example.com", tls="ssl")
            # port 465, implicit TLS, certificate checked against certifi's CAs
        MailConfig(sender="app@example.com", timeout=10)
            # at most 10 s to connect and 10 s to send each message
        MailConfig(sender="app@example.com", connect_timeout=5, send_timeout=60)
            # at most 5 s to connect, 60 s to send each message
        MailConfig(sender="app@example.com", host="mx.internal", tls="ssl",
                   trust="pinned", pinned_fingerprints=["AB:CD:...:EF"])
            # trust only the server certificate with this SHA-256 fingerprint

    The timeouts are *deadlines* for whole phases, not per socket operation:
    a server trickling one byte a second cannot stretch a 30 s send phase.
    The connect phase covers DNS, TCP, TLS handshakes, the greeting, EHLO,
    STARTTLS and AUTH; the send phase covers one message, from ``MAIL FROM``
    to the reply after the final ``.``.  They do *not* cover time a message
    waits in the outbox (that is ``retry_interval`` and ``expiration``), and
    several messages sent over one connection take one send phase each.

    Connections are pooled: a ``Notifier`` keeps at most ``max_connections``
    open at once (``send_many`` and the outbox worker spread their messages
    over them; ``send`` reuses an idle one), says QUIT and reconnects after
    ``max_messages_per_connection`` messages on one connection, and starts at
    most ``max_messages_per_second`` messages a second over all of them (off
    by default; set it when the provider throttles)::

        MailConfig(sender="app@example.com", max_connections=4,
                   max_messages_per_connection=100, max_messages_per_second=10)

    The password is a `pydantic.SecretStr`: ``repr``, ``str``, validation
    errors and dumps show ``**********``.  To dump it in clear text, ask for
    it: ``config.model_dump(context={"reveal_secrets": True})`` (the same
    context works with ``model_dump_json``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    host: str = Field(
        default="localhost",
        description="SMTP server: a host name or IP address (IPv6 without brackets).",
    )
    port: Annotated[int | None, BeforeValidator(_not_bool)] = Field(
        default=None,
        ge=1,
        le=65535,
        description="Server port; None means 465 for tls='ssl', 587 for 'starttls', 25 for 'none'.",
    )
    sender: str = Field(
        description='The From of every notification: "addr@example.com" or "Name <addr@...>".',
    )
    username: str | None = Field(default=None, description="AUTH user name (with password).")
    password: SecretStr | None = Field(default=None, description="AUTH password (with username).")
    timeout: _Seconds = Field(
        default=30.0, description="Default for both deadlines, in seconds (1-300)."
    )
    connect_timeout: _Seconds | None = Field(
        default=None, description="Deadline of the connect phase, in seconds; None -> timeout."
    )
    send_timeout: _Seconds | None = Field(
        default=None, description="Deadline of sending one message, in seconds; None -> timeout."
    )
    tls: Literal["none", "starttls", "ssl"] = Field(
        default="none",
        description="'starttls': required STARTTLS; 'ssl': implicit TLS; 'none': never TLS.",
    )
    trust: Literal["verify", "all", "pinned"] = Field(
        default="verify",
        description="'verify': certifi CAs; 'all': no verification; 'pinned': only the pins.",
    )
    pinned_certificates: tuple[str, ...] = Field(
        default=(),
        description="PEM certificates trusted as anchors when trust='pinned'.",
    )
    pinned_fingerprints: tuple[str, ...] = Field(
        default=(),
        description="SHA-256 fingerprints of accepted leaf certificates when trust='pinned'.",
    )
    check_hostname: bool = Field(
        default=True, description="Check the host name for 'verify' and pinned certificates."
    )
    allow_plaintext_auth: bool = Field(
        default=False, description="Allow AUTH without TLS to a host that is not loopback."
    )
    retry_interval: _Duration = Field(
        default=timedelta(minutes=5),
        ge=timedelta(seconds=1),
        description="Wait after a failed attempt before the next one (at least 1 s).",
    )
    retry_backoff: Annotated[float, BeforeValidator(_not_bool)] = Field(
        default=1.0,
        ge=1,
        allow_inf_nan=False,
        description="Factor applied to the wait after each failed attempt (1 = fixed).",
    )
    max_retry_interval: _Duration | None = Field(
        default=None, description="Cap on the wait when retry_backoff > 1."
    )
    expiration: _Duration = Field(
        default=timedelta(days=5),
        gt=timedelta(0),
        description="Stop trying this long after the message was queued.",
    )
    local_hostname: str | None = Field(
        default=None, description="Name sent in EHLO; None -> the session chooses."
    )
    max_connections: Annotated[int, BeforeValidator(_not_bool)] = Field(
        default=1,
        ge=1,
        le=32,
        description="Most connections one Notifier holds open at once (1-32).",
    )
    max_messages_per_connection: Annotated[int | None, BeforeValidator(_not_bool)] = Field(
        default=None,
        ge=1,
        description="Say QUIT and reconnect after this many messages; None -> no limit.",
    )
    max_messages_per_second: Annotated[float | None, BeforeValidator(_not_bool)] = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Most messages started per second, over all connections; None -> no limit.",
    )

    if TYPE_CHECKING:
        # What the constructor accepts, for type checkers: wider than the stored
        # types (a str password, a list of pins, "PT5M" or 300 for a duration),
        # as pydantic converts them.  tests/test_config.py keeps it in step with
        # the fields.
        def __init__(
            self,
            *,
            host: str = ...,
            port: int | None = ...,
            sender: str,
            username: str | None = ...,
            password: str | SecretStr | None = ...,
            timeout: float = ...,
            connect_timeout: float | None = ...,
            send_timeout: float | None = ...,
            tls: Literal["none", "starttls", "ssl"] = ...,
            trust: Literal["verify", "all", "pinned"] = ...,
            pinned_certificates: str | Sequence[str] = ...,
            pinned_fingerprints: str | Sequence[str] = ...,
            check_hostname: bool = ...,
            allow_plaintext_auth: bool = ...,
            retry_interval: timedelta | float | str = ...,
            retry_backoff: float = ...,
            max_retry_interval: timedelta | float | str | None = ...,
            expiration: timedelta | float | str = ...,
            local_hostname: str | None = ...,
            max_connections: int = ...,
            max_messages_per_connection: int | None = ...,
            max_messages_per_second: float | None = ...,
        ) -> None: ...

    # ------------------------------------------------------------------ field rules

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        if not value:
            raise ValueError("host must not be empty")
        if _has_space_or_control(value):
            raise ValueError("host must not contain whitespace or control characters")
        if value.startswith("[") and value.endswith("]"):
            if not isinstance(_ip(value[1:-1]), ipaddress.IPv6Address):
                raise ValueError("host: brackets are only for IPv6 addresses, like [::1]")
            return value[1:-1]
        if ":" in value and not isinstance(_ip(value), ipaddress.IPv6Address):
            raise ValueError(
                "host must be a host name or IP address, without scheme or port "
                "(set the port with `port`)"
            )
        return value

    @field_validator("sender")
    @classmethod
    def _check_sender(cls, value: str) -> str:
        _parse_sender(value)  # before stripping: a trailing CR/LF is an error, not padding
        return value.strip()

    @field_validator("username")
    @classmethod
    def _check_username(cls, value: str | None) -> str | None:
        if value is not None and (not value or _has_line_or_control(value)):
            raise ValueError("username must be non-empty, without control characters")
        return value

    @field_validator("password")
    @classmethod
    def _check_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            secret = value.get_secret_value()
            if not secret or "\0" in secret:
                raise ValueError("password must be non-empty and must not contain NUL")
        return value

    @field_validator("local_hostname")
    @classmethod
    def _check_local_hostname(cls, value: str | None) -> str | None:
        if value is not None and (not value or _has_space_or_control(value)):
            raise ValueError(
                "local_hostname must be non-empty, without whitespace or control characters"
            )
        return value

    @field_validator("pinned_certificates", "pinned_fingerprints", mode="before")
    @classmethod
    def _one_string_is_one_entry(cls, value: Any) -> Any:
        # A bare string would otherwise be rejected (or worse, split into characters).
        return (value,) if isinstance(value, str | bytes) else value

    @field_validator("pinned_certificates")
    @classmethod
    def _parse_certificates(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        return tuple(pem for text in value for pem in _split_certificates(text, ctx))

    @field_validator("pinned_fingerprints")
    @classmethod
    def _normalise_fingerprints(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_normalise_fingerprint(i, fp) for i, fp in enumerate(value))

    # ------------------------------------------------------------------ combinations

    @model_validator(mode="after")
    def _check_combinations(self) -> Self:
        problems: list[tuple[str, Any, str]] = []
        if (self.username is None) != (self.password is None):
            missing = "password" if self.password is None else "username"
            problems.append((missing, None, "username and password go together: both or neither"))
        pins = self.pinned_certificates or self.pinned_fingerprints
        if self.trust == "pinned" and not pins:
            problems.append(
                (
                    "trust",
                    self.trust,
                    "trust='pinned' needs at least one entry in pinned_certificates "
                    "or pinned_fingerprints",
                )
            )
        if self.trust != "pinned":
            for name in ("pinned_certificates", "pinned_fingerprints"):
                if getattr(self, name):
                    problems.append(
                        (
                            name,
                            getattr(self, name),
                            f"{name} is only used with trust='pinned', but trust is "
                            f"{self.trust!r}: set trust='pinned' or remove the pins",
                        )
                    )
        if self.trust == "pinned" and self.tls == "none":
            problems.append(
                (
                    "tls",
                    self.tls,
                    "trust='pinned' has no effect without TLS: set tls='starttls' or 'ssl'",
                )
            )
        if (
            self.username is not None
            and self.tls == "none"
            and not self.allow_plaintext_auth
            and not self.is_loopback
        ):
            problems.append(
                (
                    "tls",
                    self.tls,
                    f"refusing to send username and password without TLS to {self.host!r}, "
                    "which is not loopback: set tls='starttls' or 'ssl' "
                    "(or allow_plaintext_auth=True if you must)",
                )
            )
        if self.max_retry_interval is not None and self.max_retry_interval < self.retry_interval:
            problems.append(
                (
                    "max_retry_interval",
                    self.max_retry_interval,
                    "max_retry_interval must not be shorter than retry_interval",
                )
            )
        if problems:
            raise _combination_error(type(self).__name__, problems)
        return self

    # Defined after every other validator so that it wraps them all.
    @model_validator(mode="wrap")
    @classmethod
    def _redact_errors(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        try:
            return handler(data)
        except ValidationError as exc:
            redacted = _redacted(exc)
            if redacted is None:
                raise
            raise redacted from None

    # ------------------------------------------------------------------ dumping

    @field_serializer("password")
    def _dump_password(
        self, value: SecretStr | None, info: SerializationInfo
    ) -> SecretStr | str | None:
        if value is None:
            return None
        context = info.context
        if isinstance(context, Mapping) and context.get("reveal_secrets") is True:
            return value.get_secret_value()
        return _MASK if info.mode_is_json() else value

    # ------------------------------------------------------------------ derived values

    @property
    def effective_port(self) -> int:
        """``port``, or the standard port for ``tls``: 465 ssl, 587 starttls, 25 none."""
        return self.port if self.port is not None else _DEFAULT_PORTS[self.tls]

    @property
    def effective_connect_timeout(self) -> float:
        """The connect-phase deadline in seconds: ``connect_timeout`` or ``timeout``."""
        return self.connect_timeout if self.connect_timeout is not None else self.timeout

    @property
    def effective_send_timeout(self) -> float:
        """The per-message send-phase deadline in seconds: ``send_timeout`` or ``timeout``."""
        return self.send_timeout if self.send_timeout is not None else self.timeout

    @property
    def is_loopback(self) -> bool:
        """True when ``host`` is ``localhost``, in 127.0.0.0/8 or ``::1``."""
        return _is_loopback(self.host)

    @property
    def sender_address(self) -> str:
        """The bare address of ``sender`` (its addr-spec), without display name."""
        # The sender was checked by the strict parser (no comments, no groups), so the
        # addr-spec is what stands between the angle brackets, or the whole value.
        text = self.sender
        return text[text.rindex("<") + 1 : text.rindex(">")] if "<" in text else text

    @property
    def pinned_certificates_der(self) -> tuple[bytes, ...]:
        """``pinned_certificates`` in DER form (for ``SSLContext.load_verify_locations``)."""
        return tuple(ssl.PEM_cert_to_DER_cert(pem) for pem in self.pinned_certificates)

    # ------------------------------------------------------------------ copies and loading

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy; with ``update``, the changed config is validated like a new one.

        (pydantic's own ``model_copy`` skips validation, which would let
        ``config.model_copy(update={"port": 0})`` through.)
        """
        if not update:
            return super().model_copy(deep=deep)
        data = {name: getattr(self, name) for name in self.model_fields_set}
        return self.model_validate({**data, **update})

    @classmethod
    def model_validate_json(cls, *args: Any, **kwargs: Any) -> Self:
        """Validate a JSON document; as pydantic's, but invalid JSON never echoes its text."""
        try:
            return super().model_validate_json(*args, **kwargs)
        except ValidationError as exc:
            redacted = _redacted(exc)
            if redacted is None:
                raise
            raise redacted from None

    @classmethod
    def from_env(
        cls,
        prefix: str = "SMTPNOTIFY_",
        environ: Mapping[str, str] | None = None,
        *,
        ignore: Iterable[str] = (),
    ) -> Self:
        """Build a config from environment variables named ``prefix`` + field name in capitals.

        ``SMTPNOTIFY_HOST=smtp.example.com``, ``SMTPNOTIFY_PORT=587``,
        ``SMTPNOTIFY_RETRY_INTERVAL=PT10M`` (or ``600``, seconds),
        ``SMTPNOTIFY_PINNED_FINGERPRINTS='["ab:cd:..."]'`` (a JSON array, or a
        single entry as plain text), booleans as ``true``/``false``/``1``/``0``.
        An empty variable counts as unset.  A variable with the prefix that
        names no field is an error, unless it is listed (full name) in
        ``ignore``.  ``environ`` defaults to `os.environ`.
        """
        data = _env_settings(prefix, environ, ignore, cls.model_fields, cls.__name__)
        return cls.model_validate(data)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Self:
        """Build a config from a ``.toml`` or ``.json`` file.

        The settings are the top-level keys, or, when the document has a
        ``smtpnotify`` table/object, the keys of that table (the rest of the
        file is then left to other programs).  Durations are ISO 8601 strings
        (``"PT5M"``) or numbers of seconds.
        """
        return cls.model_validate(_file_settings(path))
