"""The store: PostgreSQL (or SQLite, the embedded default) is the source of truth for batches,
requests, claims and results. Every SQL statement of the product is in this package, one
module to a table or a step: batches, ingest, claims, results, stats, loops, cache, keys,
files (with db, tables, bulk and migrations under them)."""
