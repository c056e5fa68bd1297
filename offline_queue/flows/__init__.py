"""The Prefect flows: a batch (batch.py), its chunks (chunks.py), the wait on the serving loops
(waiting.py), the serving loop as a flow run (loop.py) and the gray-release router (release.py)."""
