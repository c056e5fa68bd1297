"""The Prefect flows: a batch (batch.py), its chunks (chunks.py), the wait on the serving loops
(serving.py), the serving loop as a flow run (loop.py) and the gray-release router (release.py)."""
