"""Instruments, not product: what the tests and the benchmarks share to stand up real services
on loopback (PostgreSQL, a Prefect server), inject faults (the fault proxy), and simulate
cluster nodes that share no disk and, when asked, no 127.0.0.1 (nodes, with the Unix-socket
bridge they reach shared services through).

Nothing under offline_queue/, flows/, blocks/ or deployments/ imports this package: the product
must run without it, and it is not installed with the product.
"""
