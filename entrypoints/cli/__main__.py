"""`python -m entrypoints.cli`: the `offline-queue` command without the installed script."""

from entrypoints.cli import app

app()
