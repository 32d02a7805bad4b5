"""Fixtures start real components; each area keeps its own fixtures module."""

pytest_plugins = [
    "tests.fixtures.hsm",
    "tests.fixtures.tokens",
    "tests.fixtures.pg",
    "tests.fixtures.aws",
    "tests.fixtures.boards",
    "tests.fixtures.mqtt",
]
