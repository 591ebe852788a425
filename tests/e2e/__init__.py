"""Tests, e2e layer (see docs/testing.md)."""
