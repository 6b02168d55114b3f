"""What the CLI tests share: no STATICMOE_* variable of the machine leaks into a test (`clean_env`, autouse in every
module that imports it), and `parse` reads a `staticmoe serve` command line."""

import os

import pytest

from service import cli


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("STATICMOE_"):
            monkeypatch.delenv(name)


def parse(*argv):
    return cli.build_parser().parse_args(["serve", *argv])
