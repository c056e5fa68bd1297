"""Where the CLI reads batches from: the batch API (`--api`, key from OFFLINE_QUEUE_API_KEY) or
the store directly (`--db`). Both give batch objects in OpenAI's shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import httpx

from offline_queue.batches import batch_object, output_source
from offline_queue.store import batches, owners


class BatchSource(Protocol):
    def get(self, batch_id: str) -> dict[str, Any] | None: ...
    def recent(self, limit: int) -> list[dict[str, Any]]: ...
    def cancel(self, batch_id: str) -> dict[str, Any] | None: ...
    def download(self, batch: dict[str, Any], which: str, dest: Path) -> int: ...


class StoreSource:
    """Reading the store directly settles lost runs first (`reap_orphans`): a batch whose run
    died shows `failed` with the reason even where no API or worker is left to notice."""

    def __init__(self, db: str):
        self.db = db

    def get(self, batch_id: str) -> dict[str, Any] | None:
        owners.reap_orphans(self.db)
        batch = batches.get_batch(self.db, batch_id)
        if batch is None:
            return None
        return batch_object(self.db, batch, estimate=True).model_dump(mode="json")

    def recent(self, limit: int) -> list[dict[str, Any]]:
        owners.reap_orphans(self.db)
        rows = batches.recent_batches(self.db, limit)
        return [batch_object(self.db, b).model_dump(mode="json") for b in rows]

    def cancel(self, batch_id: str) -> dict[str, Any] | None:
        batches.request_cancel(self.db, batch_id)
        return self.get(batch_id)

    def download(self, batch: dict[str, Any], which: str, dest: Path) -> int:
        """Streamed from wherever the file is: its result rows (an API batch), a path, or
        object storage."""
        row = batches.get_batch(self.db, batch["id"])
        if row is None or not batch.get("output_file" if which == "output" else "error_file"):
            raise FileNotFoundError(f"{batch['id']} has no {which} file yet ({batch['status']})")
        size = 0
        with dest.open("wb") as out:
            for block in output_source(self.db, row, "output" if which == "output" else "errors"):
                size += out.write(block)
        return size


class ApiSource:
    def __init__(self, url: str, key: str | None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=60)

    def _json(self, response: httpx.Response) -> dict[str, Any] | None:
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            message = response.json().get("error", {}).get("message", response.text)
            raise RuntimeError(f"{response.status_code}: {message}")
        data: dict[str, Any] = response.json()
        return data

    def get(self, batch_id: str) -> dict[str, Any] | None:
        return self._json(self.client.get(f"/batches/{batch_id}"))

    def recent(self, limit: int) -> list[dict[str, Any]]:
        page = self._json(self.client.get("/batches", params={"limit": limit})) or {}
        return list(page.get("data", []))

    def cancel(self, batch_id: str) -> dict[str, Any] | None:
        return self._json(self.client.post(f"/batches/{batch_id}/cancel"))

    def submit(self, path: Path, tier: str) -> dict[str, Any]:
        with path.open("rb") as f:
            uploaded = self._json(
                self.client.post(
                    "/files", files={"file": (path.name, f)}, data={"purpose": "batch"}
                )
            )
        assert uploaded is not None
        endpoint = "/v1/chat/completions"
        batch = self._json(
            self.client.post(
                "/batches",
                json={
                    "input_file_id": uploaded["id"],
                    "endpoint": endpoint,
                    "completion_window": "24h",
                    "metadata": {"tier": tier},
                },
            )
        )
        assert batch is not None
        return batch

    def download(self, batch: dict[str, Any], which: str, dest: Path) -> int:
        file_id = batch.get("output_file_id" if which == "output" else "error_file_id")
        if not file_id:
            raise FileNotFoundError(f"{batch['id']} has no {which} file yet ({batch['status']})")
        size = 0
        with (
            self.client.stream("GET", f"/files/{file_id}/content") as response,
            dest.open("wb") as out,
        ):
            response.raise_for_status()
            for block in response.iter_bytes():
                out.write(block)
                size += len(block)
        return size
