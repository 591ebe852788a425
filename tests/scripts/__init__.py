"""Tests, scripts layer (see tests/README.md)."""
