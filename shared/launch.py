"""The `supersede` command's entry point. The package's `__init__` imports no dependency, so
this runs before redis and the services are imported: a Ctrl-C during those imports (a second
or two on a loaded host) is one line and exit 130, not a traceback."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from supersede.services.cli import main as cli

        cli()
    except KeyboardInterrupt:  # (Ctrl-C while Python imports: one line, not a traceback)
        print("supersede: interrupted", file=sys.stderr)
        sys.exit(130)
