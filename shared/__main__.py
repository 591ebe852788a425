"""`python -m supersede ...` is the `supersede` command (the only module of the package
proper that imports a service: it is the launcher, imported by nothing)."""

from supersede.services.cli import main

main()
