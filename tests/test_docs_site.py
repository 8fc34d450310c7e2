"""The documentation site builds with ``mkdocs build --strict``.

Strict mode turns every warning into a failure: a broken link or anchor
between pages, a page missing from the nav, a docstring the API reference
cannot render (griffe warnings), an unknown option.  Skipped when mkdocs is
not installed (it comes with the ``dev`` extra).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    any(
        importlib.util.find_spec(name) is None
        for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
    ),
    reason="mkdocs, mkdocs-material or mkdocstrings[python] is not installed "
    "(pip install -e '.[dev]')",
)


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,  # mkdocs.yml names the griffe extension by a path relative to the root
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING" not in done.stderr, done.stderr

    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for anchor in (
        "smtpnotify.MailConfig",
        "smtpnotify.Notifier.send",
        "smtpnotify.Notification",
        "smtpnotify.SQLiteOutbox",
        "smtpnotify.outbox.postgres.PostgresOutbox",
        "smtpnotify.SMTPNotifyError",
        "smtpnotify.testing.SMTPSink",
        "smtpnotify.testing.plugin.mail_config_for",
        "smtpnotify.testing.strategies.mail_configs",
        "smtpnotify.testing.conformance.OutboxConformance",
    ):
        assert f'id="{anchor}"' in api, anchor
    assert ":class:`" not in api  # reST roles were turned into Markdown
    assert "::: smtpnotify" not in api  # every object was found
    assert not (site / "dev").exists()  # team notes stay out of the site
    assert not (site / "_ext").exists()
    for page in ("testing", "security", "configuration", "tls", "outbox"):
        assert (site / page / "index.html").is_file()
