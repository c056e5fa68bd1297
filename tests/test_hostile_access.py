"""The API's doors against hostile callers, on SQLite and PostgreSQL: missing, bad and revoked
keys, unknown routes, bad pagination and ids, another tenant's ids — each refused in OpenAI's
shape without echoing the input; listings show a tenant its own, the access log never the key."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import cli_env, run_cli
from tests.hostile_helpers import (
    MARK,
    Case,
    Cases,
    Hostile,
    Tenant,
    hostile_api,  # noqa: F401  # the module's fixture `hostile`
    no_batch_left_running,
    raw,
    refused_in_openais_shape,
)

pytestmark = pytest.mark.usefixtures("prefect_api")

CASES = Cases()
simple = CASES.add


def anon(t: Tenant, **headers: str) -> httpx.Client:
    return httpx.Client(base_url=t.h.api.url, headers=headers, timeout=30)


def _anon_get(headers: dict[str, str]) -> Case:
    return lambda t: anon(t, **headers).get("/batches")


def _get(path: str, **params: str) -> Case:
    return lambda t: t.http().get(path, params=params)


# Auth: every path needs a live key, and nothing is read before it is checked.
for _name, _headers in {
    "auth-none": {},
    "auth-basic": {"Authorization": "Basic dXNlcjpwYXNz"},
    "auth-unknown-key": {"Authorization": f"Bearer oq-{MARK}"},
    "auth-no-scheme": {"Authorization": "oq-abc"},
    "auth-10kb-key": {"Authorization": "Bearer " + "k" * 10_000},
    "auth-sql-key": {"Authorization": "Bearer ' OR '1'='1"},
    "auth-key-with-spaces": {"Authorization": "Bearer a b c"},
}.items():
    simple(
        _name,
        {401},
        _anon_get(_headers),
    )
simple(
    "auth-latin1-key",
    {401},
    lambda t: raw(
        t.h,
        "GET /v1/batches HTTP/1.1\nHost: x\nAuthorization: Bearer \xe9\xe8\xff\nConnection: close",
    ),
)
simple(
    "auth-empty-bearer",
    {401},
    lambda t: raw(
        t.h, "GET /v1/batches HTTP/1.1\nHost: x\nAuthorization: Bearer \nConnection: close"
    ),
)
simple("auth-other-path", {401}, lambda t: anon(t).get("/files/file-abc"))
simple("auth-unknown-path", {401}, lambda t: anon(t).get("/nothing/here"))
simple("auth-docs", {401}, lambda t: httpx.get(t.h.root + "/docs"))
simple("auth-openapi", {401}, lambda t: httpx.get(t.h.root + "/openapi.json"))
simple("health-post-needs-a-key", {401}, lambda t: httpx.post(t.h.root + "/health"))
simple("auth-redoc", {401}, lambda t: httpx.get(t.h.root + "/redoc"))
simple(
    "auth-upload-before-body",
    {401},
    lambda t: raw(
        t.h,
        "POST /v1/files HTTP/1.1\nHost: x\nContent-Type: multipart/form-data; boundary=b\n"
        f"Content-Length: {5 << 30}\nConnection: close",
        b"--b\r\n",
    ),
)
simple(
    "auth-json-before-body",
    {401},
    lambda t: raw(
        t.h,
        "POST /v1/batches HTTP/1.1\nHost: x\nContent-Type: application/json\n"
        f"Content-Length: {80 << 20}\nConnection: close",
        b"{",
    ),
)
simple(
    "auth-revoked-key",
    {401},
    lambda t: _revoked_get(t),
)


def _revoked_get(t: Tenant) -> httpx.Response:
    from offline_queue.api.auth import digest
    from offline_queue.store import keys

    assert len(keys.revoke_keys(t.h.api.db, digest(t.key))) == 1
    return t.http().get("/batches")


# Routing, in OpenAI's shape too.
simple("route-unknown", {404}, lambda t: t.http().get("/nothing"))
simple("route-docs-off", {404}, lambda t: t.http().get(t.h.root + "/docs"))
simple("route-openapi-off", {404}, lambda t: t.http().get(t.h.root + "/openapi.json"))
simple("route-delete-batches", {405}, lambda t: t.http().delete("/batches"))
simple("route-put-files", {405}, lambda t: t.http().put("/files", content=b"x"))
simple("route-get-cancel", {405}, lambda t: t.http().get(f"/batches/{t.batch_id()}/cancel"))

# Pagination and ids in paths.
for _limit in ["0", "-1", "101", "1" + "0" * 30, "abc", "1.5", "", "NaN"]:
    simple(
        f"list-limit-{_limit or 'empty'}",
        {400},
        _get("/batches", limit=_limit),
    )
for _name, _after in {
    "list-after-nul": "batch_\x00",
    "list-after-10kb": "batch_" + MARK * 1000,
    "list-after-file-id": "file-abc",
    "list-after-sql": "batch_' OR 1=1",
    "list-after-unicode": "batch_\u0663\u0663",
}.items():
    simple(_name, {400}, _get("/batches", after=_after))
for _name, _path in {
    "get-batch-nul": "/batches/batch_%00x",
    "get-batch-10kb": "/batches/batch_" + "a" * 10_000,
    "get-batch-unknown": "/batches/batch_0000000000",
    "get-batch-not-an-id": "/batches/" + MARK,
    "get-file-traversal": "/files/..%2F..%2Fetc%2Fpasswd",
    "get-file-nul": "/files/file-%00",
    "get-file-unknown": "/files/file-000000",
    "get-content-unknown": "/files/file-000000/content",
    "get-content-output-unknown": "/files/batch_000000-output/content",
    "get-content-traversal": "/files/..%2F..%2Fstore.db/content",
}.items():
    simple(_name, {404}, _get(_path))
simple("cancel-unknown", {404}, lambda t: t.http().post("/batches/batch_000000/cancel"))
simple("cancel-not-an-id", {404}, lambda t: t.http().post("/batches/%00/cancel"))


def _other_tenants(method: str, path: str, kind: str) -> Case:
    """`path` with the id of a `kind` (batch, file) of another tenant: a 404, as if unknown."""
    return lambda t: t.http().request(method, path.format(getattr(t.h.tenant(), f"{kind}_id")()))


for _name, _method, _path, _kind in [
    ("get-other-tenants-batch", "GET", "/batches/{}", "batch"),
    ("cancel-other-tenants-batch", "POST", "/batches/{}/cancel", "batch"),
    ("get-other-tenants-file", "GET", "/files/{}", "file"),
    ("get-other-tenants-file-content", "GET", "/files/{}/content", "file"),
    ("get-other-tenants-output", "GET", "/files/{}-errors/content", "batch"),
]:
    simple(_name, {404}, _other_tenants(_method, _path, _kind))
simple(
    "get-own-output-not-ready",
    {404},
    lambda t: t.http().get(f"/files/{t.batch_id()}-output/content"),
)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(hostile: Hostile, name: str) -> None:
    statuses, send = CASES[name]
    refused_in_openais_shape(send(hostile.tenant()), statuses)


# --- what no input may break ----------------------------------------------------------------


def test_listing_shows_only_the_tenants_own_and_pages(hostile: Hostile) -> None:
    a, b = hostile.tenant(), hostile.tenant()
    mine = [a.batch_id() for _ in range(3)]
    theirs = b.batch_id()
    seen: list[str] = []
    after = None
    while True:
        page = a.http().get("/batches", params={"limit": 1, **({"after": after} if after else {})})
        assert page.status_code == 200
        data = page.json()
        seen += [x["id"] for x in data["data"]]
        if not data["has_more"]:
            break
        after = data["last_id"]
    assert sorted(seen) == sorted(mine)
    # another tenant's id as `after` is ignored: it neither reveals nor skips anything
    assert [x["id"] for x in a.http().get("/batches", params={"after": theirs}).json()["data"]]
    for bid in mine:
        a.http().post(f"/batches/{bid}/cancel")
    b.http().post(f"/batches/{theirs}/cancel")


def test_access_log_names_tenant_and_status_never_the_key(hostile: Hostile) -> None:
    t = hostile.tenant()
    t.http().get("/batches")
    anon(t, Authorization=f"Bearer {t.key}x").get("/batches")  # a failed login is logged too
    log = hostile.access_log.read_text()
    assert f"GET /v1/batches 200 tenant={t.name}" in log
    assert "GET /v1/batches 401 tenant=-" in log
    assert t.key not in log and "oq-" not in log


def test_keys_list_and_revoke(hostile: Hostile, prefect_api: str) -> None:
    t = hostile.tenant()
    assert t.http().get("/batches").status_code == 200
    env = cli_env(prefect_api)
    listed = run_cli("keys", "list", "--tenant", t.name, "--db", hostile.api.db, env=env)
    assert listed.returncode == 0 and t.name in listed.stdout, listed.stderr
    from offline_queue.api.auth import digest

    key_id = digest(t.key)[:12]
    assert key_id in listed.stdout and t.key not in listed.stdout
    revoked = run_cli("keys", "revoke", key_id, "--db", hostile.api.db, env=env)
    assert revoked.returncode == 0, revoked.stderr
    assert t.http().get("/batches").status_code == 401
    assert run_cli("keys", "revoke", key_id, "--db", hostile.api.db, env=env).returncode == 1


def test_zz_no_batch_left_running(hostile: Hostile) -> None:
    """Last in this module: no case above left a batch of this store running."""
    no_batch_left_running(hostile)
