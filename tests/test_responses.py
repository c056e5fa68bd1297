"""Single requests through the queue, driven by the official `openai` SDK over real HTTP:
background responses (create, retrieve, cancel), `service_tier` on a synchronous call, a client
that goes away, and the tenant's rights — each request a row in the same queue as the batches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.responses import Response
from sqlalchemy import select, update

from instruments.processes import wait_for
from offline_queue.states import Tier
from offline_queue.store import responses as single_responses
from offline_queue.store.db import session
from offline_queue.store.tables import Batch, WebhookEvent
from tests.api_helpers import Api, serve_api

pytestmark = pytest.mark.usefixtures("prefect_api")

MODEL = "smollm2"


def _settings(tmp_path: Path, db: str, engine: str, **extra: object) -> object:
    from offline_queue.api.settings import ApiSettings

    return ApiSettings(db=db, data_dir=tmp_path / "api", engine=engine, **extra)  # type: ignore[arg-type]


@pytest.fixture
def api(tmp_path: Path, pg_url: str, vllm_server: str) -> Iterator[Api]:
    """The API serving its own work (a loop of its own on the server's route)."""
    with serve_api(_settings(tmp_path, pg_url, vllm_server)) as api:  # type: ignore[arg-type]
        yield api


@pytest.fixture
def unserved(tmp_path: Path, pg_url: str, vllm_server: str) -> Iterator[Api]:
    """An API whose work goes to a cluster's loops (a deployment) — none here: what it queues
    waits."""
    settings = _settings(tmp_path, pg_url, vllm_server, deployment="route-batch/none")
    with serve_api(settings) as api:  # type: ignore[arg-type]
        yield api


def tier_of(db: str, response_id: str) -> str:
    with session(db) as s:
        batch = s.get(Batch, response_id)
        assert batch is not None
        return batch.tier


def test_a_background_response_is_queued_polled_and_answered(api: Api) -> None:
    client = api.client("acme")
    created = client.responses.create(
        model=MODEL,
        input="Say hello.",
        background=True,
        service_tier="flex",
        max_output_tokens=8,
        temperature=0,
    )
    assert created.id.startswith("resp_") and created.status in ("queued", "in_progress")
    assert created.background is True
    assert tier_of(api.db, created.id) == Tier.BULK  # flex: the bulk tier

    def answered() -> Response | None:
        r = client.responses.retrieve(created.id)
        return r if r.status in ("completed", "incomplete", "failed") else None

    done = wait_for(answered, timeout=120, interval=0.2)
    assert done is not None
    assert done.status in ("completed", "incomplete"), done
    assert done.output_text.strip()
    assert done.id == created.id and done.usage is not None and done.usage.output_tokens > 0
    # A single response is not a batch: the tenant's batch list does not show it.
    assert created.id not in {b.id for b in client.batches.list()}
    # Another tenant's id is a 404, as if it did not exist.
    with pytest.raises(openai.NotFoundError):
        api.client("globex").responses.retrieve(created.id)
    # Its ending is an event in the outbox (a webhook for acme's endpoints, a Prefect event):
    # OpenAI's `response.incomplete` for an answer cut at max_output_tokens.
    cut = client.responses.create(model=MODEL, input="Count to 50.", max_output_tokens=1)
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    with session(api.db) as s:
        kinds = {
            r.data_id: r.type
            for r in s.execute(
                select(WebhookEvent.data_id, WebhookEvent.type).where(
                    WebhookEvent.data_id.in_((created.id, cut.id))
                )
            )
        }
    assert kinds == {created.id: f"response.{done.status}", cut.id: "response.incomplete"}


def test_a_synchronous_flex_call_waits_for_its_answer_in_the_queue(api: Api) -> None:
    client = api.client("acme")
    answer = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 2+2?"}],
        max_tokens=8,
        temperature=0,
        service_tier="flex",
    )
    assert answer.choices[0].message.content
    assert answer.service_tier == "flex"
    with session(api.db) as s:
        tiers = list(s.scalars(select(Batch.tier).where(Batch.source == "response")))
    assert tiers == [Tier.BULK]
    sync = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4, temperature=0)
    assert sync.status in ("completed", "incomplete") and sync.background is False
    assert tier_of(api.db, sync.id) == Tier.STANDARD  # no service_tier: the default tier


def test_rights_and_bad_requests_are_refused_before_the_queue(api: Api) -> None:
    limited = api.client("acme", tiers=("standard", "bulk"))
    with pytest.raises(openai.PermissionDeniedError, match="service_tier priority"):
        limited.responses.create(model=MODEL, input="x", background=True, service_tier="priority")
    client = api.client("acme")
    with pytest.raises(openai.BadRequestError, match="service_tier"):
        client.responses.create(model=MODEL, input="x", background=True, service_tier="fast")
    with pytest.raises(openai.BadRequestError, match="max_output_tokens"):
        client.responses.create(model=MODEL, input="x", background=True, max_output_tokens=-1)
    with session(api.db) as s:
        assert s.scalar(select(Batch.id).where(Batch.source == "response")) is None


def test_a_queued_response_is_cancelled_and_a_client_that_leaves_cancels_its_call(
    unserved: Api,
) -> None:
    client = unserved.client("acme")
    queued = client.responses.create(model=MODEL, input="x", background=True, max_output_tokens=4)
    assert queued.status == "queued"
    cancelled = client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled"
    assert client.responses.retrieve(queued.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError, match="already cancelled"):
        client.responses.cancel(queued.id)
    # A synchronous call waits on its connection; the client gives up: the request is cancelled.
    key = unserved.key("acme")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{unserved.url}/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4},
            timeout=1.5,
        )

    def cancelled_calls() -> int:
        with session(unserved.db) as s:
            rows = s.scalars(
                select(Batch.status).where(
                    Batch.source == "response", Batch.endpoint == "/v1/chat/completions"
                )
            )
            return sum(1 for status in rows if status == "cancelled")

    wait_for(lambda: cancelled_calls() == 1, timeout=30)
    # Admission counts them: past the tenant's quota, a 429 as OpenAI's flex answers.
    quota = unserved.client("initech", max_waiting=2)
    for _ in range(2):
        quota.responses.create(model=MODEL, input="x", background=True, service_tier="flex")
    with pytest.raises(openai.RateLimitError, match="quota of 2"):
        quota.responses.create(model=MODEL, input="x", background=True, service_tier="flex")
    # One nobody serves within its window ends as `incomplete`, and says so.
    late = client.responses.create(model=MODEL, input="x", background=True, max_output_tokens=4)
    with session(unserved.db) as s:
        s.execute(update(Batch).where(Batch.id == late.id).values(expires_at=1))
    single_responses.close(unserved.db)
    assert client.responses.retrieve(late.id).status == "incomplete"
    with session(unserved.db) as s:
        kinds = list(s.scalars(select(WebhookEvent.type).where(WebhookEvent.data_id == late.id)))
    assert kinds == ["response.incomplete"]


def test_offline_queue_api_serve_answers_a_flex_call_with_a_loop_of_its_own(
    tmp_path: Path, pg_url: str, vllm_server: str, prefect_api: str
) -> None:
    """The real command, in an environment that does not ask for a process's own loops (the
    test session's does): `api serve` without --deployment serves its single requests itself."""
    import os
    import subprocess

    from instruments.loopback import free_port, healthy
    from instruments.processes import BIN, stop
    from offline_queue.api.auth import create_key
    from offline_queue.flows.waiting import SERVE_HERE_ENV
    from tests.conftest import REPO, cli_env

    key = create_key(pg_url, "acme", tiers=("standard", "bulk"))
    port = free_port()
    env = {k: v for k, v in cli_env(prefect_api).items() if k != SERVE_HERE_ENV}
    api = subprocess.Popen(
        [str(BIN / "offline-queue"), "api", "serve", "--port", str(port), "--db", pg_url,
         "--engine", vllm_server, "--data-dir", str(tmp_path / "api"), "--metrics-port", "0"],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, timeout=120)
        wait_for(lambda: healthy(f"http://127.0.0.1:{port}/health"), timeout=120)
        answer = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4,
            service_tier="flex",
        )
        assert answer.choices[0].message.content is not None
    finally:
        stop(api)
    assert os.environ.get(SERVE_HERE_ENV)  # the session's own is untouched
