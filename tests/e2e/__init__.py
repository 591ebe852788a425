"""Tests, e2e layer (see tests/README.md)."""
