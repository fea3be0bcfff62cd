"""Shared fixtures: a real driver bundle (build stage) and real OCI registries (registry stage)."""

pytest_plugins = ["tests.fixtures.bundle", "tests.fixtures.registry", "tests.fixtures.hostile_registry"]
