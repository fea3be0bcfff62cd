"""Shared fixtures: signed apt repositories (apt client), a real driver bundle (build stage), real OCI
registries and a hostile one (registry stage), a local Kubernetes API (deploy stage)."""

pytest_plugins = ["tests.fixtures.aptrepo", "tests.fixtures.bundle", "tests.fixtures.ibt", "tests.fixtures.arm64",
                  "tests.fixtures.images", "tests.fixtures.registry", "tests.fixtures.hostile_registry",
                  "tests.fixtures.kube", "tests.fixtures.release", "tests.fixtures.trixie"]
