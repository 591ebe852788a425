"""Tests, services layer (see tests/README.md)."""
