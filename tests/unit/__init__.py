"""Tests, unit layer (see tests/README.md)."""
