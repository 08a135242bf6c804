"""`ctdx results`, `ctdx studies`, `ctdx exports`: query and operate the results database."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the results/studies/exports nouns to the root `ctdx` app."""
