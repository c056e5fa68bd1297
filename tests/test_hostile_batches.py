"""Hostile batch requests to the API, on SQLite and PostgreSQL: bad JSON, file ids, endpoints,
windows, metadata, tiers, weights and idempotency keys — each refused in OpenAI's shape without
echoing the input; admission stays fair, idempotency keys are each tenant's own, and a batch its
flow refuses fails at once."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import delete

from instruments.processes import wait_for
from offline_queue.store.db import session
from tests.hostile_helpers import (
    MARK,
    MAX_JSON,
    STANDARD,
    Case,
    Cases,
    Hostile,
    Result,
    Tenant,
    hostile_api,  # noqa: F401  # the module's fixture `hostile`
    jsonl,
    no_batch_left_running,
    raw,
    refused_in_openais_shape,
)
from tests.test_pipeline import line

pytestmark = pytest.mark.usefixtures("prefect_api")

CASES = Cases()
simple = CASES.add


def _post_json(content: bytes) -> Case:
    return lambda t: t.http().post(
        "/batches", content=content, headers={"Content-Type": "application/json"}
    )


def _create_with(**body: Any) -> Case:
    return lambda t: t.create(**body)


# Batch create: the body.
for _name, _content in {
    "create-not-json": b"not json " + MARK.encode(),
    "create-json-array": b"[1, 2, 3]",
    "create-json-null": b"null",
    "create-json-string": b'"' + MARK.encode() + b'"',
    "create-empty-object": b"{}",
    "create-nan": b'{"input_file_id": NaN, "endpoint": "/v1/chat/completions"}',
    "create-infinity": b'{"input_file_id": "file-a", "endpoint": Infinity}',
    "create-huge-int": b'{"input_file_id": ' + b"9" * 5000 + b', "endpoint": "x"}',
    "create-deep-nesting": b'{"metadata": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "create-truncated-json": b'{"input_file_id": "file-',
    "create-invalid-utf8": b'{"input_file_id": "\xff\xfe", "endpoint": "/v1/chat/completions"}',
    "create-over-json-cap": b'{"metadata": {"a": "' + b"x" * (MAX_JSON + 10) + b'"}}',
}.items():
    simple(
        _name,
        {400, 413},
        _post_json(_content),
    )
simple(
    "create-declared-5gib",
    {413},
    lambda t: raw(
        t.h,
        f"POST /v1/batches HTTP/1.1\nHost: x\nAuthorization: Bearer {t.key}\n"
        f"Content-Type: application/json\nContent-Length: {5 << 30}\nConnection: close",
        b"{",
    ),
)
simple(
    "create-text-plain",
    {400},
    lambda t: t.http().post("/batches", content=b"hello", headers={"Content-Type": "text/plain"}),
)
simple("create-missing-file-id", {400}, lambda t: t.create(input_file_id=None))
simple("create-file-id-int", {400}, lambda t: t.create(input_file_id=12345))
simple("create-file-id-nul", {404}, lambda t: t.create(input_file_id="file-\x00abc"))
simple("create-file-id-10kb", {400}, lambda t: t.create(input_file_id="file-" + MARK * 1000))
simple("create-file-id-unknown", {404}, lambda t: t.create(input_file_id="file-000000000000"))
simple("create-file-id-path", {404}, lambda t: t.create(input_file_id="../../etc/passwd"))
simple("create-file-id-sql", {404}, lambda t: t.create(input_file_id="file-' OR 1=1 --"))
simple(
    "create-file-id-of-other-tenant",
    {404},
    lambda t: t.create(input_file_id=t.h.tenant().file_id()),
)
simple(
    "create-file-id-an-output", {404}, lambda t: t.create(input_file_id=f"{t.batch_id()}-output")
)
simple("create-unknown-field", {400}, lambda t: t.create(evil=MARK))
simple(
    "create-endpoint-embeddings-for-a-chat-file",
    {400},
    lambda t: t.create(endpoint="/v1/embeddings"),
)
simple("create-endpoint-moderations", {400}, lambda t: t.create(endpoint="/v1/moderations"))
simple("create-endpoint-nul", {400}, lambda t: t.create(endpoint="/v1/chat/completions\x00"))
simple("create-endpoint-long", {400}, lambda t: t.create(endpoint="/v1/" + MARK * 100))
simple("create-endpoint-int", {400}, lambda t: t.create(endpoint=7))
simple(
    "create-endpoint-mismatch-chat-as-completions",
    {400},
    lambda t: t.create(endpoint="/v1/completions"),
)
simple(
    "create-endpoint-mismatch-completions-as-chat",
    {400},
    lambda t: t.create(input_file_id=t.file_id(2, url="/v1/completions")),
)
for _window in [
    "0s",
    "24h\n",
    "\u0662\u0664h",
    "999999999999999d",
    "8d",
    "604801s",
    "24",
    "h",
    "-1h",
    "1.5h",
    " 24h",
    "",
    "24H",
    "1w",
    "0024h",
    "24h24h",
    "\uff12\uff14h",
    MARK,
]:
    simple(
        f"create-window-{_window.encode('unicode_escape').decode()!s}",
        {400},
        _create_with(completion_window=_window),
    )
simple("create-window-int", {400}, lambda t: t.create(completion_window=24))
simple("create-window-null", {400}, lambda t: t.create(completion_window=None))
simple("create-metadata-list", {400}, lambda t: t.create(metadata=["a"]))
simple(
    "create-metadata-17-keys", {400}, lambda t: t.create(metadata={f"k{i}": "v" for i in range(17)})
)
simple("create-metadata-key-65", {400}, lambda t: t.create(metadata={"k" * 65: "v"}))
simple("create-metadata-empty-key", {400}, lambda t: t.create(metadata={"": "v"}))
simple("create-metadata-value-513", {400}, lambda t: t.create(metadata={"k": MARK * 40}))
simple("create-metadata-value-int", {400}, lambda t: t.create(metadata={"k": 1}))
simple("create-metadata-value-null", {400}, lambda t: t.create(metadata={"k": None}))
simple("create-metadata-nested", {400}, lambda t: t.create(metadata={"k": {"a": "b"}}))
simple("create-metadata-nul", {400}, lambda t: t.create(metadata={"k": "a\x00b"}))
simple("create-metadata-20mb", {413}, lambda t: t.create(metadata={"k": "x" * (20 << 20)}))
simple("create-tier-gold", {400}, lambda t: t.create(metadata={"tier": "gold"}))
simple("create-tier-nul", {400}, lambda t: t.create(metadata={"tier": "critical\x00"}))
simple("create-tier-upper", {400}, lambda t: t.create(metadata={"tier": "CRITICAL"}))
simple(
    "create-tier-not-allowed",
    {403},
    lambda t: t.h.tenant(tiers=("standard",)).create(metadata={"tier": "critical"}),
)
simple(
    "create-tier-default-key-critical",
    {403},
    lambda t: t.h.tenant(tiers=None).create(metadata={"tier": "critical"}),
)
for _weight in [
    "0",
    "-1",
    "-5",
    "1.5",
    "abc",
    "99999999999999999999",
    "9223372036854775808",
    "2147483648",
    "1e3",
    "\u0661",
    " 1",
    "01",
    "1001",
    "",
]:
    simple(
        f"create-weight-{_weight or 'empty'}",
        {400},
        _create_with(metadata={"weight": _weight}),
    )
simple(
    "create-weight-over-key-cap",
    {403},
    lambda t: t.h.tenant(max_weight=3).create(metadata={"weight": "4"}),
)
simple(
    "create-idempotency-key-300",
    {400},
    lambda t: t.create(headers={"Idempotency-Key": "k" * 300}),
)
simple(
    "create-idempotency-key-spaces",
    {400},
    lambda t: t.create(headers={"Idempotency-Key": "a b"}),
)
simple(
    "create-idempotency-key-latin1",
    {400},
    lambda t: raw(
        t.h,
        f"POST /v1/batches HTTP/1.1\nHost: x\nAuthorization: Bearer {t.key}\n"
        "Idempotency-Key: \xe9t\xe9\nContent-Type: application/json\nContent-Length: 2\n"
        "Connection: close",
        b"{}",
    ),
)
simple("create-idempotency-reuse-other-metadata", {409}, lambda t: _reuse(t, metadata={"x": "y"}))
simple("create-idempotency-reuse-other-window", {409}, lambda t: _reuse(t, completion_window="1h"))
simple(
    "create-idempotency-reuse-other-file",
    {409},
    lambda t: _reuse(t, input_file_id=t.file_id(2)),
)
simple("create-over-waiting-quota", {429}, lambda t: _quota(t))
simple(
    "create-more-than-the-tier-takes",
    {429},
    lambda t: t.create(input_file_id=t.file_id(STANDARD + 1)),
)


def _reuse(t: Tenant, **change: Any) -> httpx.Response:
    key = f"k-{uuid.uuid4().hex}"
    first = t.create(headers={"Idempotency-Key": key})
    assert first.status_code == 200, first.text
    again = t.create(headers={"Idempotency-Key": key}, **change)
    t.http().post(f"/batches/{first.json()['id']}/cancel")
    return again


def _quota(t: Tenant) -> httpx.Response:
    small = t.h.tenant(max_waiting=1)
    return small.create(input_file_id=small.file_id(2))


def _flood(t: Tenant) -> Result:
    """Twenty bad requests at once from one tenant: each still answered on its own."""
    bodies = [b"{", b"[]", b'{"input_file_id": NaN}', b"null"] * 5
    out: list[httpx.Response] = []
    lock = threading.Lock()

    def send(body: bytes) -> None:
        r = t.http().post("/batches", content=body, headers={"Content-Type": "application/json"})
        with lock:
            out.append(r)

    threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(out) == 20 and all(r.status_code == 400 for r in out), [r.status_code for r in out]
    return out[0]


simple("concurrent-bad-creates", {400}, _flood)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(hostile: Hostile, name: str) -> None:
    statuses, send = CASES[name]
    refused_in_openais_shape(send(hostile.tenant()), statuses)


def test_the_case_count() -> None:
    """The three tables of bad inputs (access, uploads, batches), their names distinct."""
    from tests.test_hostile_access import CASES as ACCESS
    from tests.test_hostile_uploads import CASES as UPLOADS

    tables = {"access": ACCESS, "uploads": UPLOADS, "batches": CASES}
    names = {name for table in tables.values() for name in table}
    assert len(names) == sum(len(table) for table in tables.values())
    counts = ", ".join(f"{len(table)} {topic}" for topic, table in tables.items())
    print(f"{len(names)} distinct bad inputs ({counts}), each run on SQLite and on PostgreSQL")
    assert len(names) >= 100


# --- what no input may break ----------------------------------------------------------------


def test_one_tenants_backlog_does_not_refuse_anothers_first_batch(hostile: Hostile) -> None:
    """A fills the critical tier (no case uses it); A's next batch is a 429 that names only A's
    numbers, and B's first batch is admitted all the same."""
    a, b = hostile.tenant(), hostile.tenant()
    slow = jsonl([line(f"s{i}", max_tokens=64, ignore_eos=True) for i in range(45)])
    b_early = b.create(
        input_file_id=b.upload(jsonl([line("e", max_tokens=1)])).json()["id"],
        metadata={"tier": "critical"},
    )
    a_file = a.upload(slow).json()["id"]
    a_batches = [a.create(input_file_id=a_file, metadata={"tier": "critical"}) for _ in range(2)]
    assert [r.status_code for r in a_batches] == [200, 200], [r.text for r in a_batches]
    refused = a.create(input_file_id=a_file, metadata={"tier": "critical"})
    assert refused.status_code == 429 and refused.headers["retry-after"], refused.text
    message = refused.json()["error"]["message"]
    assert "your" in message and "100" not in message and "91" not in message, message
    b_first = b.create(input_file_id=b.upload(slow).json()["id"], metadata={"tier": "critical"})
    assert b_first.status_code == 200, b_first.text
    for t, r in [(b, b_early), (a, a_batches[0]), (a, a_batches[1]), (b, b_first)]:
        t.http().post(f"/batches/{r.json()['id']}/cancel")


def test_idempotency_keys_are_each_tenants_own(hostile: Hostile) -> None:
    """`acme` with key `team:nightly` and `acme:team` with key `nightly` no longer collide; the
    same key with the same request is the same batch."""
    suffix = uuid.uuid4().hex[:6]
    acme = Tenant(hostile, f"acme{suffix}", hostile.api.key(f"acme{suffix}"))
    team = Tenant(hostile, f"acme{suffix}:team", hostile.api.key(f"acme{suffix}:team"))
    one = acme.create(headers={"Idempotency-Key": "team:nightly"}, metadata={"who": "acme"})
    two = team.create(headers={"Idempotency-Key": "nightly"})
    assert one.status_code == two.status_code == 200
    assert one.json()["id"] != two.json()["id"] and not two.json()["metadata"]
    again = acme.create(headers={"Idempotency-Key": "team:nightly"}, metadata={"who": "acme"})
    assert again.status_code == 200 and again.json()["id"] == one.json()["id"]
    other = team.create(headers={"Idempotency-Key": "team:nightly"})
    assert other.status_code == 200 and other.json()["id"] not in (one.json()["id"],)
    for t, r in ((acme, one), (team, two), (team, other)):
        t.http().post(f"/batches/{r.json()['id']}/cancel")


def test_a_batch_the_flow_refuses_fails_at_once(hostile: Hostile) -> None:
    """A run that raises ends its batch `failed` with the reason (no server path in it), instead
    of `validating` for ever; its requests stop counting against anyone's admission."""
    t = hostile.tenant()
    fid = t.file_id(2)
    with session(hostile.api.db) as s:
        from offline_queue.store.tables import FileChunk

        # the file's bytes are gone from under the batch
        s.execute(delete(FileChunk).where(FileChunk.file_id == fid))
    created = t.create(input_file_id=fid)
    assert created.status_code == 200, created.text
    bid = created.json()["id"]

    def ended() -> dict[str, Any] | None:
        b: dict[str, Any] = t.http().get(f"/batches/{bid}").json()
        return b if b["status"] in ("failed", "completed", "cancelled", "expired") else None

    done = wait_for(ended, timeout=120, interval=0.5)
    assert done is not None
    assert done["status"] == "failed" and done["errors"]["data"], done
    assert str(hostile.data_dir) not in json.dumps(done["errors"])


def test_zz_no_batch_left_running(hostile: Hostile) -> None:
    """Last in this module: no case above left a batch of this store running."""
    no_batch_left_running(hostile)
