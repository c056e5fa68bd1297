"""`python -m offline_queue.cli`: the `offline-queue` command without the installed script."""

from offline_queue.cli import app

app()
