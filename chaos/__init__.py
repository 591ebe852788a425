"""`make chaos`: the whole system under faults, checked against a ledger the handlers write.

See `python -m chaos --help` and the README's "Chaos run" section.
"""
