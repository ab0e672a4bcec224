"""The package version, written once: pyproject.toml's ``[project] version``.

An installed wheel answers from its metadata (importlib.metadata). A source tree (an editable
install, or the repository on sys.path) reads pyproject.toml beside the package instead, since
an editable install's metadata keeps the version of the day it was installed.
"""

from __future__ import annotations

import os
import re


def _from_pyproject() -> str | None:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    if not project or not re.search(r'^name\s*=\s*"fastgrad"', project.group(1), re.M):
        return None  # some other project's pyproject.toml
    m = re.search(r'^version\s*=\s*"([^"]+)"', project.group(1), re.M)
    return m.group(1) if m else None


def _version() -> str:
    v = _from_pyproject()
    if v:
        return v
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("fastgrad")
    except PackageNotFoundError:
        return "0+unknown"


__version__ = _version()
