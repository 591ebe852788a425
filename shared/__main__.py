"""`python -m supersede ...` is the `supersede` command (see `supersede.launch`)."""

from supersede.launch import main

main()
