"""`python -m supersede ...` is the `supersede` command (the only module of the package
proper that imports a service: it is the launcher, imported by nothing)."""

import sys

try:
    from supersede.services.cli import main

    main()
except KeyboardInterrupt:  # (Ctrl-C while Python imports: one line, not a traceback)
    print("supersede: interrupted", file=sys.stderr)
    sys.exit(130)
