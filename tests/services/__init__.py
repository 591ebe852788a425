"""Tests, services layer (see docs/testing.md)."""
