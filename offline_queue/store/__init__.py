"""The store: PostgreSQL (or SQLite, the embedded default) is the source of truth for batches,
requests, claims and results."""
