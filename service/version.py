"""The distribution's version (pyproject.toml), for `staticmoe --version`, the OpenAPI schema and the log."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path


def package_version() -> str:
    try:
        return importlib.metadata.version("staticmoe")
    except importlib.metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH, not installed
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        return match.group(1) if match else "unknown"
