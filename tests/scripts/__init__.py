"""Tests, scripts layer (see docs/testing.md)."""
