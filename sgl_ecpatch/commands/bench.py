"""CLI commands of this area; registered by sgl_ecpatch.cli (stub until written)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the ecpatch app."""
