"""`ctdx` sub-commands of the worker package."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this package's commands to the root `ctdx` app."""
