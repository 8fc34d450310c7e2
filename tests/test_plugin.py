"""The pytest plugin (``smtpnotify.testing.plugin``), used as an application would.

Each test writes a small application test module into a temporary directory and
runs pytest on it with pytester: the fixtures come from the ``pytest11`` entry
point alone (the sample modules import no plugin), under
``filterwarnings = error`` so an unclosed socket or sink fails the run.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from smtpnotify.testing import CertificateBundle

pytest_plugins = ["pytester"]

# No cache directory; no hypothesis plugin (its import and summary take seconds per
# run, and the sample tests do not use it).
FLAGS = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")

INI = """
[pytest]
filterwarnings =
    error
"""

# A tiny "application": what a project's own code would look like.
APP = """
from smtpnotify import Notification, Notifier


def send_welcome(notifier: Notifier, email: str, name: str) -> str:
    result = notifier.send(
        Notification(f"{name} <{email}>", f"Welcome, {name}!", text=f"Hello {name}.\\n")
    )
    return result.message_id


def queue_report(notifier: Notifier, email: str) -> str:
    return notifier.notify(Notification(email, "Weekly report", text="All good.\\n"))
"""

SAMPLE_TESTS = """
import pytest

from smtpnotify import Notification, Notifier, OutboxStatus, RecipientsRefused
from myapp import queue_report, send_welcome

CLOSED = {}


def test_welcome_mail_is_sent(notifier, smtp_sink):
    message_id = send_welcome(notifier, "ann@example.com", "Ann Müller")
    [message] = smtp_sink.wait_for(1)
    assert message.rcpt_tos == ("ann@example.com",)
    assert message.message["Subject"] == "Welcome, Ann Müller!"
    assert message.message["Message-ID"] == message_id
    CLOSED["sink"] = smtp_sink
    CLOSED["notifier"] = notifier
    CLOSED["outbox"] = memory_outbox_of(notifier)
    # message.message is parsed from the bytes on the wire: CRLF line endings.
    assert message.message.get_content() == "Hello Ann Müller.\\r\\n"


def memory_outbox_of(notifier):
    return notifier.outbox


def test_fixtures_were_closed_after_the_previous_test():
    assert "stopped" in repr(CLOSED["sink"])
    assert "closed" in repr(CLOSED["outbox"])
    with pytest.raises(RuntimeError, match="closed"):
        CLOSED["notifier"].start()


def test_report_is_queued_then_delivered(notifier, memory_outbox, smtp_sink):
    entry_id = queue_report(notifier, "ops@example.com")
    assert notifier.outbox is memory_outbox
    assert memory_outbox.get(entry_id).status is OutboxStatus.PENDING
    assert smtp_sink.messages == []
    report = notifier.deliver_due()
    assert report.sent == 1
    assert memory_outbox.get(entry_id).status is OutboxStatus.SENT
    [message] = smtp_sink.wait_for(1)
    assert message.message["Subject"] == "Weekly report"


def test_mail_config_points_at_the_sink(mail_config, smtp_sink):
    assert (mail_config.host, mail_config.port) == (smtp_sink.host, smtp_sink.port)
    assert mail_config.tls == "none"
    assert mail_config.sender_address == "noreply@example.com"


def test_starttls_sink_and_a_config_that_trusts_it(smtp_sink_factory, mail_config_factory):
    sink = smtp_sink_factory(tls="starttls", require_starttls=True)
    config = mail_config_factory(sink, sender="Shop <shop@example.com>")
    assert config.trust == "pinned"
    with Notifier(config) as notifier:
        send_welcome(notifier, "bob@example.com", "Bob")
    [message] = sink.wait_for(1)
    assert message.tls is True
    assert message.mail_from == "shop@example.com"


def test_implicit_tls_and_auth(smtp_sink_factory, mail_config_factory):
    sink = smtp_sink_factory(tls="ssl", auth={"app": "s3cret"}, auth_required=True)
    config = mail_config_factory(sink, username="app", password="s3cret")
    with Notifier(config) as notifier:
        send_welcome(notifier, "bob@example.com", "Bob")
    [message] = sink.wait_for(1)
    assert message.tls is True
    assert message.authenticated_user == "app"


def test_a_refused_recipient(smtp_sink_factory, mail_config_factory):
    sink = smtp_sink_factory(replies={"RCPT": {"gone@example.com": (550, "5.1.1 no such user")}})
    with Notifier(mail_config_factory(sink)) as notifier:
        with pytest.raises(RecipientsRefused):
            send_welcome(notifier, "gone@example.com", "Gone")
    assert sink.messages == []


def test_a_server_that_says_try_later(smtp_sink, notifier):
    smtp_sink.replies["MAIL"] = (451, "4.3.0 try later")
    queue_report(notifier, "ops@example.com")
    assert notifier.deliver_due().retried == 1
    assert smtp_sink.messages == []
"""


@pytest.fixture(autouse=True)
def _preload(certs: CertificateBundle) -> None:
    """Import what the inner runs use before they start.

    An in-process pytester run removes the modules it imported when it ends;
    cryptography imported there and again later would be two copies whose
    classes do not match ("curve must be an EllipticCurve instance").  The
    ``certs`` fixture has made certificates, so cryptography and trustme are
    loaded for good; the sink's modules too.
    """
    import aiosmtpd.controller  # noqa: F401
    import hypothesis.strategies  # noqa: F401

    import smtpnotify.testing._sink  # noqa: F401


@pytest.fixture
def app(pytester: pytest.Pytester) -> pytest.Pytester:
    """A project directory holding the sample application and a strict pytest.ini."""
    pytester.makeini(INI)
    pytester.makepyfile(myapp=APP)
    pytester.syspathinsert()
    return pytester


def test_sample_application_tests_pass_in_a_fresh_process(app: pytest.Pytester) -> None:
    app.makepyfile(test_sample=SAMPLE_TESTS)
    result = app.runpytest_subprocess(*FLAGS)
    result.assert_outcomes(passed=8)


def test_the_plugin_is_registered_by_its_entry_point(app: pytest.Pytester) -> None:
    app.makepyfile(
        test_one="""
        def test_uses_a_fixture(smtp_sink):
            assert smtp_sink.port
        """
    )
    assert app.runpytest(*FLAGS).ret == pytest.ExitCode.OK
    result = app.runpytest(*FLAGS, "-p", "no:smtpnotify")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'smtp_sink' not found*"])


def test_a_wrong_expectation_fails(app: pytest.Pytester) -> None:
    app.makepyfile(
        test_wrong="""
        from myapp import send_welcome

        def test_subject(notifier, smtp_sink):
            send_welcome(notifier, "ann@example.com", "Ann")
            [message] = smtp_sink.wait_for(1)
            assert message.message["Subject"] == "Welcome aboard"

        def test_nothing_was_sent(notifier, smtp_sink):
            smtp_sink.wait_for(1, timeout=0.2)
        """
    )
    result = app.runpytest(*FLAGS)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        ["*AssertionError*Welcome, Ann!*Welcome aboard*", "*TimeoutError: SMTPSink*"]
    )


def test_a_conftest_fixture_overrides_the_plugins(app: pytest.Pytester) -> None:
    app.makeconftest(
        """
        import pytest
        from smtpnotify.testing import mail_config_for

        @pytest.fixture
        def mail_config(smtp_sink):
            return mail_config_for(smtp_sink, sender="My App <app@example.org>")
        """
    )
    app.makepyfile(
        test_sender="""
        from myapp import send_welcome

        def test_sender(notifier, smtp_sink):
            send_welcome(notifier, "ann@example.com", "Ann")
            [message] = smtp_sink.wait_for(1)
            assert message.mail_from == "app@example.org"
        """
    )
    app.runpytest(*FLAGS).assert_outcomes(passed=1)


def test_the_plugin_imports_no_sink_until_a_fixture_is_used(app: pytest.Pytester) -> None:
    app.makepyfile(
        test_plain=textwrap.dedent(
            """
            import sys

            def test_nothing_loaded():
                assert "aiosmtpd" not in sys.modules
                assert "smtpnotify.testing._sink" not in sys.modules
                assert "smtpnotify.testing.plugin" in sys.modules
            """
        )
    )
    result = app.runpytest_subprocess(*FLAGS)
    result.assert_outcomes(passed=1)


def test_the_test_modules_in_the_testing_guide_pass(pytester: pytest.Pytester) -> None:
    """docs/testing.md shows test modules and a conftest.py: they run as pytest would."""
    page = Path(__file__).resolve().parent.parent / "docs" / "testing.md"
    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.M | re.S)
    files = {}
    for block in blocks:
        name = re.match(r"# ((?:test_\w+|conftest)\.py)\b", block)
        if name:
            files[name.group(1)] = block
    assert "conftest.py" in files
    assert len([f for f in files if f.startswith("test_")]) >= 2
    pytester.makeini(INI)
    for filename, source in files.items():
        pytester.path.joinpath(filename).write_text(source, encoding="utf-8")
    result = pytester.runpytest(*FLAGS)
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 10
    assert "failed" not in outcomes and "errors" not in outcomes
