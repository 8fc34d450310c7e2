"""``python -m smtpnotify``: the command line."""

from .cli import main

raise SystemExit(main())
