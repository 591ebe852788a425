"""Tests, deploy layer (see docs/testing.md)."""
