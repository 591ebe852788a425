"""Tests, deploy layer (see tests/README.md)."""
