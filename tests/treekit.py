"""Helpers for tests that build miniature dataset trees (empty files: layout readers do not open them)."""
from __future__ import annotations

from pathlib import Path

from sslbench import recipes


def task(name: str, **data) -> dict:
    """A task recipe as the protocol reads it (extends and defaults applied), with data overrides."""
    t = recipes.load_task(name)
    t["data"].update(data)
    return t


def touch(path: Path) -> Path:
    """An empty file at ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def ids(items: list[dict]) -> list[str]:
    return [it["id"] for it in items]
