"""Tests, unit layer (see docs/testing.md)."""
