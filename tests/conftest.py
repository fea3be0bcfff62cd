"""Shared fixtures: signed apt repositories (apt client), a real driver bundle (build stage) and real OCI
registries (registry stage)."""

pytest_plugins = ["tests.fixtures.aptrepo", "tests.fixtures.bundle", "tests.fixtures.registry"]
