"""Fixtures and hooks for every tier; shared helpers live in the `helpers` package (tests/helpers)."""
