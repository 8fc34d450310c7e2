"""MailConfig: every rule of SPEC §1, loading from env and files, and secret hygiene."""

from __future__ import annotations

import ast
import inspect
import json
import math
import ssl
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, SecretStr, ValidationError

from smtpnotify._config import MailConfig

SENDER = "noreply@example.com"
PASSWORD_STEM = "pa55-Sup3r-s3cret"
PASSWORD = f"{PASSWORD_STEM}-\N{SNOWMAN}"
MASK = "**********"
FINGERPRINT = "0123456789abcdef" * 4
CA = trustme.CA()
CA_PEM = CA.cert_pem.bytes().decode()
LEAF_PEM = CA.issue_cert("localhost").cert_chain_pems[0].bytes().decode()
OTHER_CA_PEM = trustme.CA().cert_pem.bytes().decode()
PRIVATE_KEY_PEM = CA.private_key_pem.bytes().decode()
PINNED: dict[str, Any] = {"tls": "ssl", "trust": "pinned"}


def make(**kwargs: Any) -> MailConfig:
    kwargs.setdefault("sender", SENDER)
    return MailConfig(**kwargs)


def reject(**kwargs: Any) -> ValidationError:
    """Build a config that must fail; return the error after checking the password stays hidden."""
    with pytest.raises(ValidationError) as info:
        make(**kwargs)
    assert_no_secret(info.value)
    return info.value


def assert_no_secret(exc: ValidationError) -> None:
    text = "\n".join([str(exc), repr(exc), exc.json(), repr(exc.errors())])
    assert PASSWORD_STEM not in text  # the ASCII part: JSON may escape the snowman
    assert PRIVATE_KEY_PEM.splitlines()[1] not in text


def locs(exc: ValidationError) -> list[tuple[int | str, ...]]:
    return [tuple(error["loc"]) for error in exc.errors()]


def only_message(exc: ValidationError) -> str:
    [error] = exc.errors()
    return error["msg"]


# --------------------------------------------------------------------------- defaults


def test_defaults_are_the_spec_table() -> None:
    config = make()
    assert config.host == "localhost"
    assert config.port is None
    assert config.sender == SENDER
    assert config.username is None
    assert config.password is None
    assert config.timeout == 30
    assert config.connect_timeout is None
    assert config.send_timeout is None
    assert config.tls == "none"
    assert config.trust == "verify"
    assert config.pinned_certificates == ()
    assert config.pinned_fingerprints == ()
    assert config.check_hostname is True
    assert config.allow_plaintext_auth is False
    assert config.retry_interval == timedelta(minutes=5)
    assert config.retry_backoff == 1.0
    assert config.max_retry_interval is None
    assert config.expiration == timedelta(days=5)
    assert config.local_hostname is None


def test_sender_is_required() -> None:
    with pytest.raises(ValidationError) as info:
        MailConfig()  # type: ignore[call-arg]
    assert locs(info.value) == [("sender",)]


def test_unknown_field_is_rejected_without_echoing_its_value() -> None:
    exc = reject(hostname="smtp.example.com")
    assert locs(exc) == [("hostname",)]
    exc = reject(username="app", passwd=PASSWORD)  # reject() checks the value stays hidden
    assert sorted(locs(exc)) == [("passwd",)]


def test_constructor_signature_for_type_checkers_lists_every_field() -> None:
    source = Path(inspect.getfile(MailConfig)).read_text(encoding="utf-8")
    [init] = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef) and node.name == "__init__"
    ]
    params = [arg.arg for arg in init.args.kwonlyargs]
    assert params == list(MailConfig.model_fields)
    required = [
        arg.arg
        for arg, default in zip(init.args.kwonlyargs, init.args.kw_defaults, strict=True)
        if default is None
    ]
    assert required == [name for name, f in MailConfig.model_fields.items() if f.is_required()]


def test_config_is_frozen_and_hashable() -> None:
    config = make()
    with pytest.raises(ValidationError):
        config.host = "elsewhere"
    assert hash(config) == hash(make())
    assert config == make()
    assert config != make(port=2525)


# --------------------------------------------------------------------------- host and port


@pytest.mark.parametrize(
    "host",
    ["localhost", "smtp.example.com", "127.0.0.1", "::1", "2001:db8::25", "bücher.example"],
)
def test_host_accepts_names_and_addresses(host: str) -> None:
    assert make(host=host).host == host


def test_host_ipv6_in_brackets_is_unwrapped() -> None:
    assert make(host="[::1]").host == "::1"


@pytest.mark.parametrize(
    ("host", "rule"),
    [
        ("", "must not be empty"),
        (" smtp.example.com", "whitespace"),
        ("smtp example.com", "whitespace"),
        ("smtp.example.com\r\nRCPT", "whitespace or control"),
        ("smtp\x00.example.com", "control"),
        ("\u200bsmtp.example.com", "control"),
        ("smtp.example.com:587", "without scheme or port"),
        ("smtp://smtp.example.com", "without scheme or port"),
        ("[smtp.example.com]", "only for IPv6"),
        ("[127.0.0.1]", "only for IPv6"),
    ],
)
def test_host_rejects(host: str, rule: str) -> None:
    exc = reject(host=host)
    assert locs(exc) == [("host",)]
    assert rule in only_message(exc)


@pytest.mark.parametrize(("port", "expected"), [(1, 1), (65535, 65535), ("2525", 2525)])
def test_port_in_range(port: int | str, expected: int) -> None:
    assert make(port=port).port == expected


@pytest.mark.parametrize("port", [0, -1, 65536, True, "smtp", 25.5])
def test_port_rejects(port: object) -> None:
    assert locs(reject(port=port)) == [("port",)]


@pytest.mark.parametrize(
    ("tls", "port", "expected"),
    [("none", None, 25), ("starttls", None, 587), ("ssl", None, 465), ("ssl", 2465, 2465)],
)
def test_effective_port(tls: str, port: int | None, expected: int) -> None:
    assert make(tls=tls, port=port).effective_port == expected


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LOCALHOST", True),
        ("localhost.", True),
        ("127.0.0.1", True),
        ("127.255.3.4", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("128.0.0.1", False),
        ("10.0.0.1", False),
        ("::2", False),
        ("localhost.example.com", False),
        ("mylocalhost", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert make(host=host).is_loopback is loopback


# --------------------------------------------------------------------------- sender

GOOD_SENDERS = [
    ("noreply@example.com", "noreply@example.com"),
    ("Change Desk <noreply@example.com>", "noreply@example.com"),
    ("<noreply@example.com>", "noreply@example.com"),
    ('"Desk, Change" <noreply@example.com>', "noreply@example.com"),
    ("Zoë Ångström <zoe@example.com>", "zoe@example.com"),
    ("Bücher <info@bücher.example>", "info@bücher.example"),
    ("josé@example.com", "josé@example.com"),
    ("noreply@localhost", "noreply@localhost"),
    ("root@[192.0.2.1]", "root@[192.0.2.1]"),
    ("  padded@example.com  ", "padded@example.com"),
]


@pytest.mark.parametrize(("sender", "address"), GOOD_SENDERS)
def test_sender_accepts(sender: str, address: str) -> None:
    config = make(sender=sender)
    assert config.sender == sender.strip()
    assert config.sender_address == address


@pytest.mark.parametrize(
    "sender",
    [
        "",
        "   ",
        "noreply",
        "@example.com",
        "noreply@",
        "alice@example.org(<bob@example.com>",
        "alice@example.org(x)<bob@example.com>",
        '"two words"@example.com',  # quoted local parts: the message module refuses them too
        "a(comment)@example.com",
        "alice@example.org <bob@example.com>",
        "a@example.com, b@example.com",
        "Desk, Change <noreply@example.com>",
        "undisclosed-recipients:;",
        "group: a@example.com;",
        "<noreply@example.com",
        "noreply@example.com>",
        "noreply@example..com",
        "no..reply@example.com",
        "noreply@-example.com",
        "noreply@exa_mple.com",
        "noreply@[not-an-ip]",
        "=?utf-8?q?Desk=0D=0ABcc=3A_x?= <noreply@example.com>",
    ],
)
def test_sender_rejects(sender: str) -> None:
    exc = reject(sender=sender)
    assert locs(exc) == [("sender",)]
    assert "sender" in only_message(exc)


@pytest.mark.parametrize("bad", ["\r", "\n", "\r\n", "\x00", "\x85", "\u2028"])
def test_sender_rejects_line_breaks_and_controls(bad: str) -> None:
    exc = reject(sender=f"Desk{bad}Bcc: victim@example.org <noreply@example.com>")
    assert "control characters" in only_message(exc)


@settings(max_examples=80, deadline=None)
@given(
    st.text(max_size=20),
    st.sampled_from(["\r", "\n", "\r\n"]),
    st.text(max_size=20),
)
def test_any_sender_with_cr_or_lf_is_rejected(before: str, newline: str, after: str) -> None:
    with pytest.raises(ValidationError):
        make(sender=before + newline + after)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([s for s, _ in GOOD_SENDERS]), st.data())
def test_cr_or_lf_anywhere_in_a_good_sender_is_rejected(sender: str, data: st.DataObject) -> None:
    sender = sender.strip()
    at = data.draw(st.integers(0, len(sender)))
    newline = data.draw(st.sampled_from(["\r", "\n", "\r\n"]))
    with pytest.raises(ValidationError):
        make(sender=sender[:at] + newline + sender[at:])


# --------------------------------------------------------------------------- credentials


def test_credentials_both() -> None:
    config = make(username="app", password=PASSWORD, tls="starttls")
    assert config.username == "app"
    assert isinstance(config.password, SecretStr)
    assert config.password.get_secret_value() == PASSWORD


def test_username_without_password() -> None:
    exc = reject(username="app", tls="starttls")
    assert locs(exc) == [("password",)]
    assert "both or neither" in only_message(exc)


def test_password_without_username() -> None:
    exc = reject(password=PASSWORD, tls="starttls")
    assert locs(exc) == [("username",)]
    assert "both or neither" in only_message(exc)


@pytest.mark.parametrize("username", ["", "app\r\nMAIL FROM:<x@y>", "app\x00"])
def test_username_rejects(username: str) -> None:
    assert locs(reject(username=username, password=PASSWORD, tls="starttls")) == [("username",)]


@pytest.mark.parametrize("password", ["", f"{PASSWORD}\x00"])
def test_password_rejects_empty_and_nul(password: str) -> None:
    exc = reject(username="app", password=password, tls="starttls")
    assert locs(exc) == [("password",)]
    assert "non-empty" in only_message(exc)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.8.9.10", "::1"])
def test_plaintext_auth_to_loopback_is_allowed(host: str) -> None:
    config = make(host=host, username="app", password=PASSWORD)
    assert config.tls == "none"


@pytest.mark.parametrize("host", ["smtp.example.com", "192.0.2.25", "2001:db8::25"])
def test_plaintext_auth_to_remote_host_is_refused(host: str) -> None:
    exc = reject(host=host, username="app", password=PASSWORD)
    assert locs(exc) == [("tls",)]
    message = only_message(exc)
    assert "without TLS" in message
    assert "allow_plaintext_auth" in message


def test_plaintext_auth_allowed_when_asked_for() -> None:
    config = make(
        host="smtp.example.com", username="app", password=PASSWORD, allow_plaintext_auth=True
    )
    assert config.allow_plaintext_auth is True


@pytest.mark.parametrize("tls", ["starttls", "ssl"])
def test_auth_over_tls_to_remote_host(tls: str) -> None:
    assert make(host="smtp.example.com", username="a", password=PASSWORD, tls=tls).tls == tls


def test_remote_host_without_credentials_needs_no_tls() -> None:
    assert make(host="smtp.example.com").tls == "none"


# --------------------------------------------------------------------------- timeouts


@pytest.mark.parametrize("field", ["timeout", "connect_timeout", "send_timeout"])
@pytest.mark.parametrize("value", [1, 1.0, 12.5, 300, "45"])
def test_timeouts_in_range(field: str, value: float | str) -> None:
    assert getattr(make(**{field: value}), field) == float(value)


@pytest.mark.parametrize("field", ["timeout", "connect_timeout", "send_timeout"])
@pytest.mark.parametrize("value", [0, 0.999, 300.001, -5, math.nan, math.inf, True, "soon"])
def test_timeouts_reject(field: str, value: object) -> None:
    assert locs(reject(**{field: value})) == [(field,)]


def test_effective_timeouts_fall_back_to_timeout() -> None:
    config = make(timeout=12)
    assert config.effective_connect_timeout == 12
    assert config.effective_send_timeout == 12
    config = make(timeout=12, connect_timeout=3, send_timeout=90)
    assert config.effective_connect_timeout == 3
    assert config.effective_send_timeout == 90


# --------------------------------------------------------------------------- tls and trust


@pytest.mark.parametrize("field", ["tls", "trust"])
@pytest.mark.parametrize("value", ["SSL", "tls", "", "verify-all", None])
def test_tls_and_trust_are_closed_sets(field: str, value: object) -> None:
    assert locs(reject(**{field: value})) == [(field,)]


@pytest.mark.parametrize("tls", ["none", "starttls", "ssl"])
@pytest.mark.parametrize("check_hostname", [True, False])
def test_trust_all_and_verify(tls: str, check_hostname: bool) -> None:
    assert make(tls=tls, trust="all").trust == "all"
    config = make(tls=tls, trust="verify", check_hostname=check_hostname)
    assert config.check_hostname is check_hostname


def test_pinned_needs_a_pin() -> None:
    exc = reject(**PINNED)
    assert locs(exc) == [("trust",)]
    assert "at least one" in only_message(exc)


@pytest.mark.parametrize("tls", ["starttls", "ssl"])
def test_pinned_with_a_fingerprint_or_a_certificate(tls: str) -> None:
    assert make(tls=tls, trust="pinned", pinned_fingerprints=[FINGERPRINT]).trust == "pinned"
    assert make(tls=tls, trust="pinned", pinned_certificates=[CA_PEM]).trust == "pinned"
    both = make(
        tls=tls, trust="pinned", pinned_certificates=[CA_PEM], pinned_fingerprints=[FINGERPRINT]
    )
    assert both.pinned_fingerprints == (FINGERPRINT,)


def test_pinned_without_tls_is_rejected() -> None:
    exc = reject(trust="pinned", pinned_fingerprints=[FINGERPRINT])
    assert locs(exc) == [("tls",)]
    assert "no effect without TLS" in only_message(exc)


@pytest.mark.parametrize("trust", ["verify", "all"])
@pytest.mark.parametrize(
    ("field", "value"), [("pinned_certificates", [CA_PEM]), ("pinned_fingerprints", [FINGERPRINT])]
)
def test_pins_without_trust_pinned_are_rejected(trust: str, field: str, value: list[str]) -> None:
    exc = reject(tls="ssl", trust=trust, **{field: value})
    assert locs(exc) == [(field,)]
    assert "only used with trust='pinned'" in only_message(exc)


# --------------------------------------------------------------------------- pinned certificates


def der(pem: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem)


def test_certificates_are_parsed_and_kept_one_per_entry() -> None:
    config = make(**PINNED, pinned_certificates=[CA_PEM, LEAF_PEM])
    assert config.pinned_certificates_der == (der(CA_PEM), der(LEAF_PEM))
    assert all(pem.count("BEGIN CERTIFICATE") == 1 for pem in config.pinned_certificates)


def test_a_bundle_string_is_split_into_certificates() -> None:
    bundle = f"# Issuer: test CA\n{CA_PEM}\n# the server\n{LEAF_PEM}"
    config = make(**PINNED, pinned_certificates=bundle)
    assert config.pinned_certificates_der == (der(CA_PEM), der(LEAF_PEM))
    listed = make(**PINNED, pinned_certificates=[bundle, OTHER_CA_PEM])
    assert listed.pinned_certificates_der == (der(CA_PEM), der(LEAF_PEM), der(OTHER_CA_PEM))


def test_certificates_are_stored_canonically() -> None:
    messy = "\r\n".join(f"  {line}" for line in CA_PEM.splitlines()) + "\r\n\r\n"
    assert make(**PINNED, pinned_certificates=[messy]) == make(
        **PINNED, pinned_certificates=[CA_PEM]
    )
    assert make(**PINNED, pinned_certificates=[CA_PEM]).pinned_certificates == (
        ssl.DER_cert_to_PEM_cert(der(CA_PEM)),
    )


def test_certificates_can_be_bytes() -> None:
    config = make(**PINNED, pinned_certificates=[CA.cert_pem.bytes()])
    assert config.pinned_certificates_der == (der(CA_PEM),)


def _corrupt(pem: str) -> str:
    lines = pem.splitlines()
    lines[3] = "A" * len(lines[3])
    return "\n".join(lines)


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("garbage", "no PEM certificate found"),
        ("", "no PEM certificate found"),
        (CA_PEM.replace("-----END CERTIFICATE-----", ""), "no matching -----END"),
        (CA_PEM + "-----BEGIN CERTIFICATE-----\nMIIB\n", "no matching -----END"),
        (CA_PEM.replace("END CERTIFICATE", "END X509 CRL"), "no matching -----END"),
        (CA_PEM.replace("CERTIFICATE", "X509 CRL"), "not a CERTIFICATE"),
        ("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----", "X.509"),
        (_corrupt(CA_PEM), "X.509"),
        (PRIVATE_KEY_PEM, "private key"),
        (CA_PEM + PRIVATE_KEY_PEM, "private key"),
    ],
)
def test_certificates_reject(text: str, rule: str) -> None:
    exc = reject(**PINNED, pinned_certificates=[text])
    assert locs(exc) == [("pinned_certificates",)]
    assert rule in only_message(exc)


# --------------------------------------------------------------------------- fingerprints


def test_fingerprints_are_normalised() -> None:
    colons = ":".join(FINGERPRINT[i : i + 2] for i in range(0, 64, 2)).upper()
    config = make(**PINNED, pinned_fingerprints=[colons, FINGERPRINT.upper(), f" {FINGERPRINT}\n"])
    assert config.pinned_fingerprints == (FINGERPRINT,) * 3


def test_a_single_fingerprint_string_is_one_entry() -> None:
    assert make(**PINNED, pinned_fingerprints=FINGERPRINT).pinned_fingerprints == (FINGERPRINT,)


@pytest.mark.parametrize(
    "fingerprint",
    [
        FINGERPRINT[:-1],
        FINGERPRINT + "0",
        "g" + FINGERPRINT[1:],
        "sha256:" + FINGERPRINT,
        FINGERPRINT[:30] + ":" + FINGERPRINT[30:],
        ":".join(FINGERPRINT[i : i + 4] for i in range(0, 64, 4)),
        "",
    ],
)
def test_fingerprints_reject(fingerprint: str) -> None:
    exc = reject(**PINNED, pinned_fingerprints=[FINGERPRINT, fingerprint])
    assert locs(exc) == [("pinned_fingerprints",)]
    assert "pinned_fingerprints[1] is not a SHA-256 fingerprint" in only_message(exc)


def test_sha1_fingerprint_gets_a_hint() -> None:
    exc = reject(**PINNED, pinned_fingerprints=["ab" * 20])
    assert "SHA-1" in only_message(exc)


def _fingerprint_spellings(digest: bytes) -> st.SearchStrategy[str]:
    pairs = [f"{b:02x}" for b in digest]
    return st.builds(
        lambda sep, cases: sep.join(
            p.upper() if up else p for p, up in zip(pairs, cases, strict=True)
        ),
        st.sampled_from(["", ":"]),
        st.lists(st.booleans(), min_size=32, max_size=32),
    )


@settings(max_examples=60, deadline=None)
@given(
    st.binary(min_size=32, max_size=32).flatmap(
        lambda d: st.tuples(st.just(d), _fingerprint_spellings(d))
    )
)
def test_fingerprint_normalisation_property(case: tuple[bytes, str]) -> None:
    digest, spelled = case
    config = make(**PINNED, pinned_fingerprints=[spelled])
    assert config.pinned_fingerprints == (digest.hex(),)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="0123456789abcdefABCDEF:", max_size=100))
def test_only_64_hex_digits_pass(text: str) -> None:
    digits = text.replace(":", "")
    well_formed = len(text) == 64 or (len(text) == 95 and text[2::3] == ":" * 31)
    valid = len(digits) == 64 and ":" not in text[::3] and well_formed
    if valid:
        assert make(**PINNED, pinned_fingerprints=[text]).pinned_fingerprints == (digits.lower(),)
    else:
        with pytest.raises(ValidationError):
            make(**PINNED, pinned_fingerprints=[text])


# --------------------------------------------------------------------------- retry and expiry


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (timedelta(seconds=1), timedelta(seconds=1)),
        ("PT5M", timedelta(minutes=5)),
        ("PT1M30S", timedelta(seconds=90)),
        ("300", timedelta(seconds=300)),
        (" 2.5 ", timedelta(seconds=2.5)),
        (60, timedelta(minutes=1)),
    ],
)
def test_retry_interval_accepts(value: object, expected: timedelta) -> None:
    assert make(retry_interval=value).retry_interval == expected


@pytest.mark.parametrize("value", [timedelta(milliseconds=999), 0, -60, "-PT5M", "soon", True])
def test_retry_interval_rejects(value: object) -> None:
    assert locs(reject(retry_interval=value)) == [("retry_interval",)]


@pytest.mark.parametrize("value", [1, 1.5, 2, "3"])
def test_retry_backoff_accepts(value: float | str) -> None:
    assert make(retry_backoff=value).retry_backoff == float(value)


@pytest.mark.parametrize("value", [0.99, 0, -2, math.nan, math.inf, True])
def test_retry_backoff_rejects(value: object) -> None:
    assert locs(reject(retry_backoff=value)) == [("retry_backoff",)]


def test_max_retry_interval_caps_from_retry_interval_up() -> None:
    config = make(retry_interval="PT5M", retry_backoff=2, max_retry_interval="PT1H")
    assert config.max_retry_interval == timedelta(hours=1)
    assert make(retry_interval=60, max_retry_interval=60).max_retry_interval == timedelta(minutes=1)


def test_max_retry_interval_below_retry_interval_is_rejected() -> None:
    exc = reject(retry_interval="PT5M", max_retry_interval="PT4M")
    assert locs(exc) == [("max_retry_interval",)]
    assert "not be shorter than retry_interval" in only_message(exc)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("P5D", timedelta(days=5)),
        (0.5, timedelta(milliseconds=500)),
        ("P1DT2H", timedelta(hours=26)),
    ],
)
def test_expiration_accepts(value: object, expected: timedelta) -> None:
    assert make(expiration=value).expiration == expected


@pytest.mark.parametrize("value", [0, "PT0S", -1, "-P1D", False])
def test_expiration_rejects(value: object) -> None:
    assert locs(reject(expiration=value)) == [("expiration",)]


# --------------------------------------------------------------------------- local_hostname


@pytest.mark.parametrize("name", ["client.example.com", "[192.0.2.1]", "[IPv6:2001:db8::1]"])
def test_local_hostname_accepts(name: str) -> None:
    assert make(local_hostname=name).local_hostname == name


@pytest.mark.parametrize("name", ["", "two words", "host\r\nMAIL FROM:<x@y>", "tab\there"])
def test_local_hostname_rejects(name: str) -> None:
    assert locs(reject(local_hostname=name)) == [("local_hostname",)]


# --------------------------------------------------------------------------- copies


def test_model_copy_validates_updates() -> None:
    config = make(tls="starttls")
    assert config.model_copy(update={"port": 2587}).effective_port == 2587
    assert config.model_copy() == config
    with pytest.raises(ValidationError):
        config.model_copy(update={"port": 0})
    with pytest.raises(ValidationError):
        config.model_copy(update={"host": "smtp.example.com", "tls": "none", "username": "a"})


def test_model_copy_keeps_the_password_and_fields_set() -> None:
    config = make(host="smtp.example.com", tls="ssl", username="app", password=PASSWORD)
    copy = config.model_copy(update={"timeout": 10})
    assert copy.password == config.password
    assert copy.model_fields_set == config.model_fields_set | {"timeout"}


# --------------------------------------------------------------------------- secrets


def secret_config(**kwargs: Any) -> MailConfig:
    return make(
        host="smtp.example.com", tls="starttls", username="app", password=PASSWORD, **kwargs
    )


def test_password_never_in_repr_str_or_default_dumps() -> None:
    config = secret_config()
    for text in (repr(config), str(config), config.model_dump_json(), repr(config.model_dump())):
        assert PASSWORD_STEM not in text  # the ASCII part: JSON may escape the snowman
    assert json.loads(config.model_dump_json())["password"] == MASK
    dumped = config.model_dump()["password"]
    assert isinstance(dumped, SecretStr)
    assert str(dumped) == MASK
    assert config.model_dump(mode="json")["password"] == MASK


def test_reveal_secrets_dumps_the_password() -> None:
    config = secret_config()
    reveal = {"reveal_secrets": True}
    assert config.model_dump(context=reveal)["password"] == PASSWORD
    assert config.model_dump(mode="json", context=reveal)["password"] == PASSWORD
    assert json.loads(config.model_dump_json(context=reveal))["password"] == PASSWORD
    assert json.loads(config.model_dump_json(context={"reveal_secrets": "yes"}))["password"] == MASK


def test_no_password_dumps_null() -> None:
    assert make().model_dump(context={"reveal_secrets": True})["password"] is None
    assert json.loads(make().model_dump_json())["password"] is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port": 0},  # an unrelated field error
        {"host": "smtp.example.com", "tls": "none"},  # a combination error
        {"password": PASSWORD + "\x00"},  # the password itself is invalid
        {"username": None},  # both-or-neither
        {"sender": "Desk <x@example.com>\r\n"},  # a sender error
    ],
)
def test_password_never_in_validation_errors(kwargs: dict[str, Any]) -> None:
    data: dict[str, Any] = {"sender": SENDER, "tls": "starttls", "username": "app"}
    data.update({"password": PASSWORD, **kwargs})
    with pytest.raises(ValidationError) as info:
        MailConfig.model_validate(data)
    assert_no_secret(info.value)


def test_secrets_never_in_errors_that_echo_the_whole_input() -> None:
    with pytest.raises(ValidationError) as info:  # "missing" echoes the whole input
        MailConfig(username="app", password=PASSWORD, pinned_certificates=[PRIVATE_KEY_PEM])  # type: ignore[call-arg]
    assert ("sender",) in locs(info.value)
    assert_no_secret(info.value)


def test_password_never_in_json_validation_errors() -> None:
    document = json.dumps({"sender": SENDER, "username": "app", "password": PASSWORD, "port": 0})
    with pytest.raises(ValidationError) as info:
        MailConfig.model_validate_json(document)
    assert_no_secret(info.value)
    with pytest.raises(ValidationError) as info:
        MailConfig.model_validate_json(document[:-5])  # invalid JSON
    assert_no_secret(info.value)


def test_password_never_in_errors_of_an_enclosing_model() -> None:
    class AppSettings(BaseModel):  # a user's model, without hide_input_in_errors
        mail: MailConfig

    data = {"sender": SENDER, "host": "smtp.example.com", "username": "a", "password": PASSWORD}
    with pytest.raises(ValidationError) as info:
        AppSettings.model_validate({"mail": data})
    assert_no_secret(info.value)
    assert [e["loc"] for e in info.value.errors()] == [("mail", "tls")]
    with pytest.raises(ValidationError) as info:
        AppSettings.model_validate({"mail": {**data, "tls": "ssl", "password": PASSWORD + "\x00"}})
    assert_no_secret(info.value)


def test_private_key_never_in_errors() -> None:
    exc = reject(**PINNED, pinned_certificates=[PRIVATE_KEY_PEM])
    assert "PRIVATE KEY" in only_message(exc).upper()  # named, not shown


# --------------------------------------------------------------------------- round trips

HOSTS = st.sampled_from(
    ["localhost", "127.0.0.1", "::1", "smtp.example.com", "bücher.example", "192.0.2.1"]
)
SECONDS = st.floats(min_value=1, max_value=300, allow_nan=False)
DURATIONS = st.timedeltas(min_value=timedelta(seconds=1), max_value=timedelta(days=3650))


@st.composite
def configs(draw: st.DrawFn) -> MailConfig:
    tls = draw(st.sampled_from(["none", "starttls", "ssl"]))
    trust = draw(
        st.sampled_from(["verify", "all"] if tls == "none" else ["verify", "all", "pinned"])
    )
    data: dict[str, Any] = {
        "host": draw(HOSTS),
        "port": draw(st.none() | st.integers(1, 65535)),
        "sender": draw(st.sampled_from([s for s, _ in GOOD_SENDERS])),
        "timeout": draw(SECONDS),
        "connect_timeout": draw(st.none() | SECONDS),
        "send_timeout": draw(st.none() | SECONDS),
        "tls": tls,
        "trust": trust,
        "check_hostname": draw(st.booleans()),
        "allow_plaintext_auth": draw(st.booleans()),
        "retry_interval": draw(DURATIONS),
        "retry_backoff": draw(st.floats(min_value=1, max_value=10)),
        "expiration": draw(DURATIONS),
        "local_hostname": draw(st.none() | st.sampled_from(["client.example.com", "[192.0.2.7]"])),
    }
    if draw(st.booleans()):
        data["max_retry_interval"] = data["retry_interval"] * draw(st.integers(1, 10))
    if draw(st.booleans()):
        data["username"] = draw(
            st.text(st.characters(exclude_categories=["Cc", "Cs", "Zl", "Zp"]), min_size=1)
        )
        password = draw(st.text(st.characters(exclude_characters="\x00")))
        data["password"] = f"secret:{password}"  # recognisable in a dump, never the mask
        if tls == "none" and not make(host=data["host"]).is_loopback:
            data["allow_plaintext_auth"] = True
    if trust == "pinned":
        certs = draw(st.lists(st.sampled_from([CA_PEM, LEAF_PEM, OTHER_CA_PEM]), max_size=3))
        prints = draw(st.lists(st.binary(min_size=32, max_size=32).map(bytes.hex), max_size=2))
        data["pinned_certificates"] = certs
        data["pinned_fingerprints"] = prints or ([] if certs else [FINGERPRINT])
    return MailConfig(**data)


@settings(max_examples=60, deadline=None)
@given(configs())
def test_json_round_trip_with_revealed_password(config: MailConfig) -> None:
    dumped = config.model_dump_json(context={"reveal_secrets": True})
    assert MailConfig.model_validate_json(dumped) == config
    assert MailConfig.model_validate(config.model_dump(context={"reveal_secrets": True})) == config


@settings(max_examples=60, deadline=None)
@given(configs())
def test_json_round_trip_masks_only_the_password(config: MailConfig) -> None:
    again = MailConfig.model_validate_json(config.model_dump_json())
    if config.password is None:
        assert again == config
    else:
        assert again.password is not None
        assert again.password.get_secret_value() == MASK
        assert again.model_copy(update={"password": config.password}) == config
        assert config.password.get_secret_value() not in config.model_dump_json()


# --------------------------------------------------------------------------- from_env

FULL_ENV = {
    "SMTPNOTIFY_HOST": "smtp.example.com",
    "SMTPNOTIFY_PORT": "2465",
    "SMTPNOTIFY_SENDER": "Change Desk <noreply@example.com>",
    "SMTPNOTIFY_USERNAME": "app",
    "SMTPNOTIFY_PASSWORD": PASSWORD,
    "SMTPNOTIFY_TIMEOUT": "20",
    "SMTPNOTIFY_CONNECT_TIMEOUT": "5",
    "SMTPNOTIFY_SEND_TIMEOUT": "60.5",
    "SMTPNOTIFY_TLS": "ssl",
    "SMTPNOTIFY_TRUST": "pinned",
    "SMTPNOTIFY_PINNED_CERTIFICATES": json.dumps([CA_PEM]),
    "SMTPNOTIFY_PINNED_FINGERPRINTS": json.dumps([FINGERPRINT.upper()]),
    "SMTPNOTIFY_CHECK_HOSTNAME": "false",
    "SMTPNOTIFY_ALLOW_PLAINTEXT_AUTH": "0",
    "SMTPNOTIFY_RETRY_INTERVAL": "PT2M",
    "SMTPNOTIFY_RETRY_BACKOFF": "2",
    "SMTPNOTIFY_MAX_RETRY_INTERVAL": "3600",
    "SMTPNOTIFY_EXPIRATION": "P2D",
    "SMTPNOTIFY_LOCAL_HOSTNAME": "client.example.com",
    "SMTPNOTIFY_MAX_CONNECTIONS": "4",
    "SMTPNOTIFY_MAX_MESSAGES_PER_CONNECTION": "100",
    "SMTPNOTIFY_MAX_MESSAGES_PER_SECOND": "2.5",
    "PATH": "/usr/bin",
    "SMTPNOTIFYHOST": "not ours",
}


def test_from_env_reads_every_field() -> None:
    config = MailConfig.from_env(environ=FULL_ENV)
    assert config == MailConfig(
        host="smtp.example.com",
        port=2465,
        sender="Change Desk <noreply@example.com>",
        username="app",
        password=PASSWORD,
        timeout=20,
        connect_timeout=5,
        send_timeout=60.5,
        tls="ssl",
        trust="pinned",
        pinned_certificates=(CA_PEM,),
        pinned_fingerprints=(FINGERPRINT,),
        check_hostname=False,
        allow_plaintext_auth=False,
        retry_interval=timedelta(minutes=2),
        retry_backoff=2,
        max_retry_interval=timedelta(hours=1),
        expiration=timedelta(days=2),
        local_hostname="client.example.com",
        max_connections=4,
        max_messages_per_connection=100,
        max_messages_per_second=2.5,
    )
    assert set(FULL_ENV) - {"PATH", "SMTPNOTIFYHOST"} == {
        f"SMTPNOTIFY_{name.upper()}" for name in MailConfig.model_fields
    }


def test_from_env_plain_text_pins() -> None:
    env = {
        "SMTPNOTIFY_SENDER": SENDER,
        "SMTPNOTIFY_TLS": "starttls",
        "SMTPNOTIFY_TRUST": "pinned",
        "SMTPNOTIFY_PINNED_CERTIFICATES": CA_PEM + LEAF_PEM,
        "SMTPNOTIFY_PINNED_FINGERPRINTS": FINGERPRINT,
    }
    config = MailConfig.from_env(environ=env)
    assert config.pinned_certificates_der == (der(CA_PEM), der(LEAF_PEM))
    assert config.pinned_fingerprints == (FINGERPRINT,)


def test_from_env_empty_values_are_unset() -> None:
    env = {"SMTPNOTIFY_SENDER": SENDER, "SMTPNOTIFY_PORT": "", "SMTPNOTIFY_HOST": ""}
    assert MailConfig.from_env(environ=env) == make()


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("1", True), ("FALSE", False)])
def test_from_env_booleans(value: str, expected: bool) -> None:
    env = {"SMTPNOTIFY_SENDER": SENDER, "SMTPNOTIFY_CHECK_HOSTNAME": value}
    assert MailConfig.from_env(environ=env).check_hostname is expected


def test_from_env_unknown_variable_is_an_error_that_hides_its_value() -> None:
    env = {"SMTPNOTIFY_SENDER": SENDER, "SMTPNOTIFY_PASSWD": PASSWORD}
    with pytest.raises(ValidationError) as info:
        MailConfig.from_env(environ=env)
    assert_no_secret(info.value)
    assert locs(info.value) == [("SMTPNOTIFY_PASSWD",)]
    assert "not a MailConfig setting" in only_message(info.value)
    assert "SMTPNOTIFY_PASSWORD" in only_message(info.value)


def test_from_env_ignore_skips_named_variables() -> None:
    env = {"SMTPNOTIFY_SENDER": SENDER, "SMTPNOTIFY_CONFIG": "/etc/smtpnotify.toml"}
    assert MailConfig.from_env(environ=env, ignore=["SMTPNOTIFY_CONFIG"]) == make()


def test_from_env_invalid_json_array() -> None:
    env = {"SMTPNOTIFY_SENDER": SENDER, "SMTPNOTIFY_PINNED_FINGERPRINTS": '["ab", '}
    with pytest.raises(ValidationError) as info:
        MailConfig.from_env(environ=env)
    assert locs(info.value) == [("SMTPNOTIFY_PINNED_FINGERPRINTS",)]
    assert "not a valid JSON array" in only_message(info.value)


def test_from_env_invalid_value_names_the_field_and_hides_the_password() -> None:
    env = {**FULL_ENV, "SMTPNOTIFY_PORT": "0"}
    with pytest.raises(ValidationError) as info:
        MailConfig.from_env(environ=env)
    assert locs(info.value) == [("port",)]
    assert_no_secret(info.value)


def test_from_env_missing_sender() -> None:
    with pytest.raises(ValidationError) as info:
        MailConfig.from_env(environ={"SMTPNOTIFY_HOST": "localhost"})
    assert locs(info.value) == [("sender",)]


def test_from_env_custom_prefix_and_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYAPP_MAIL_SENDER", SENDER)
    monkeypatch.setenv("MYAPP_MAIL_PORT", "2525")
    monkeypatch.setenv("MYAPP_OTHER", "unrelated")
    config = MailConfig.from_env("MYAPP_MAIL_")
    assert (config.sender, config.port) == (SENDER, 2525)


def test_from_env_needs_a_prefix() -> None:
    with pytest.raises(ValueError, match="prefix"):
        MailConfig.from_env("", environ={})


# --------------------------------------------------------------------------- from_file

TOML_SETTINGS = f"""
host = "smtp.example.com"
sender = "Change Desk <noreply@example.com>"
username = "app"
password = "{PASSWORD}"
tls = "ssl"
trust = "pinned"
pinned_certificates = [\"\"\"
{CA_PEM}\"\"\"]
pinned_fingerprints = ["{FINGERPRINT.upper()}"]
timeout = 20
retry_interval = "PT2M"
max_retry_interval = 3600
expiration = "P2D"
"""


def expected_file_config() -> MailConfig:
    return make(
        host="smtp.example.com",
        sender="Change Desk <noreply@example.com>",
        username="app",
        password=PASSWORD,
        tls="ssl",
        trust="pinned",
        pinned_certificates=[CA_PEM],
        pinned_fingerprints=[FINGERPRINT],
        timeout=20,
        retry_interval=timedelta(minutes=2),
        max_retry_interval=timedelta(hours=1),
        expiration=timedelta(days=2),
    )


def test_from_file_toml_top_level(tmp_path: Path) -> None:
    path = tmp_path / "mail.toml"
    path.write_text(TOML_SETTINGS, encoding="utf-8")
    assert MailConfig.from_file(path) == expected_file_config()
    assert MailConfig.from_file(str(path)) == expected_file_config()


def test_from_file_toml_smtpnotify_table(tmp_path: Path) -> None:
    path = tmp_path / "app.TOML"
    path.write_text(
        f'[database]\nurl = "sqlite://"\n\n[smtpnotify]\n{TOML_SETTINGS}', encoding="utf-8"
    )
    assert MailConfig.from_file(path) == expected_file_config()


def test_from_file_json(tmp_path: Path) -> None:
    config = expected_file_config()
    top = tmp_path / "mail.json"
    top.write_text(config.model_dump_json(context={"reveal_secrets": True}), encoding="utf-8")
    assert MailConfig.from_file(top) == config
    nested = tmp_path / "app.json"
    nested.write_text(
        json.dumps(
            {"smtpnotify": config.model_dump(mode="json", context={"reveal_secrets": True})}
        ),
        encoding="utf-8",
    )
    assert MailConfig.from_file(nested) == config


def test_from_file_errors_name_the_field_and_hide_the_password(tmp_path: Path) -> None:
    path = tmp_path / "mail.toml"
    path.write_text(TOML_SETTINGS + "port = 70000\nbogus = 1\n", encoding="utf-8")
    with pytest.raises(ValidationError) as info:
        MailConfig.from_file(path)
    assert sorted(locs(info.value)) == [("bogus",), ("port",)]
    assert_no_secret(info.value)


def test_from_file_rejects_other_suffixes_and_non_tables(tmp_path: Path) -> None:
    path = tmp_path / "mail.yaml"
    path.write_text("sender: x@example.com\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\.toml or \.json"):
        MailConfig.from_file(path)
    listed = tmp_path / "mail.json"
    listed.write_text(json.dumps([SENDER]), encoding="utf-8")
    with pytest.raises(ValidationError):
        MailConfig.from_file(listed)
    with pytest.raises(FileNotFoundError):
        MailConfig.from_file(tmp_path / "missing.toml")


# --------------------------------------------------------------------------- the pool


def test_pool_fields_default_to_one_connection_and_no_limits() -> None:
    config = make()
    assert config.max_connections == 1
    assert config.max_messages_per_connection is None
    assert config.max_messages_per_second is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_connections", 1),
        ("max_connections", 32),
        ("max_messages_per_connection", 1),
        ("max_messages_per_connection", 10_000),
        ("max_messages_per_second", 0.01),
        ("max_messages_per_second", 14),
    ],
)
def test_pool_fields_accept_their_range(field: str, value: float) -> None:
    assert getattr(make(**{field: value}), field) == value


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("max_connections", 0, "greater than or equal to 1"),
        ("max_connections", 33, "less than or equal to 32"),
        ("max_connections", 2.5, "integer"),
        ("max_connections", True, "not a boolean"),
        ("max_connections", None, "integer"),
        ("max_messages_per_connection", 0, "greater than or equal to 1"),
        ("max_messages_per_connection", -3, "greater than or equal to 1"),
        ("max_messages_per_connection", False, "not a boolean"),
        ("max_messages_per_second", 0, "greater than 0"),
        ("max_messages_per_second", -1.5, "greater than 0"),
        ("max_messages_per_second", math.inf, "finite"),
        ("max_messages_per_second", math.nan, "finite"),
        ("max_messages_per_second", True, "not a boolean"),
    ],
)
def test_pool_fields_reject_values_out_of_range(field: str, value: Any, rule: str) -> None:
    exc = reject(**{field: value})
    assert locs(exc) == [(field,)]
    assert rule in only_message(exc)


def test_pool_fields_from_env_and_file(tmp_path: Path) -> None:
    config = MailConfig.from_env(
        environ={
            "SMTPNOTIFY_SENDER": SENDER,
            "SMTPNOTIFY_MAX_CONNECTIONS": "8",
            "SMTPNOTIFY_MAX_MESSAGES_PER_CONNECTION": "",  # empty: unset, no limit
            "SMTPNOTIFY_MAX_MESSAGES_PER_SECOND": "0.5",
        }
    )
    assert (config.max_connections, config.max_messages_per_connection) == (8, None)
    assert config.max_messages_per_second == 0.5
    path = tmp_path / "mail.toml"
    path.write_text(
        f'sender = "{SENDER}"\nmax_connections = 4\nmax_messages_per_connection = 50\n',
        encoding="utf-8",
    )
    loaded = MailConfig.from_file(path)
    assert (loaded.max_connections, loaded.max_messages_per_connection) == (4, 50)
    assert MailConfig.model_validate_json(loaded.model_dump_json()) == loaded


@settings(max_examples=50)
@given(
    connections=st.integers(min_value=-5, max_value=40),
    per_connection=st.none() | st.integers(min_value=-5, max_value=10**6),
    rate=st.none() | st.floats(allow_nan=True, allow_infinity=True),
)
def test_pool_fields_are_valid_exactly_within_their_rules(
    connections: int, per_connection: int | None, rate: float | None
) -> None:
    valid = (
        1 <= connections <= 32
        and (per_connection is None or per_connection >= 1)
        and (rate is None or (rate > 0 and math.isfinite(rate)))
    )
    kwargs: dict[str, Any] = {
        "max_connections": connections,
        "max_messages_per_connection": per_connection,
        "max_messages_per_second": rate,
    }
    if valid:
        config = make(**kwargs)
        assert config.max_connections == connections
        assert config.max_messages_per_second == rate
    else:
        reject(**kwargs)
