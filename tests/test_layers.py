"""The import layering docs/ARCHITECTURE.md states ("What each part may import"), checked on
every import of the package, those inside functions included."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "offline_queue"

DOMAIN = {
    "states", "formats", "batch_object", "findings", "content", "durations", "prefix", "retry",
    "window", "model", "release", "submission", "catalog", "routes", "heartbeat", "gpu_time",
}  # fmt: skip
SERVICES = {
    "storage", "validate", "runs", "files", "batches", "queue_file", "cache", "serving", "loop",
    "leases", "eta", "expiry", "metrics", "streams", "webhooks",
}  # fmt: skip
UPPER = {"blocks", "flows", "pools", "api", "cli"}
ALLOWED = {
    "domain": DOMAIN | {"engines.base"},
    "engines": DOMAIN | {"engines"},
    "store": DOMAIN | {"engines.base", "store"},
    "services": DOMAIN | SERVICES | {"engines.base", "store"},
}
PREFECT_EXCEPTIONS = {("webhooks", "announce")}
"""(module, function) that may import Prefect inside a function, as ARCHITECTURE.md says."""


def part_of(module: str) -> str:
    head = module.split(".")[0]
    if head in DOMAIN:
        return "domain"
    if head in SERVICES:
        return "services"
    return head  # engines, store, blocks, flows, pools, api, cli, migrations' store


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if "migrations" in name or name == "__init__":
            continue
        yield name.removesuffix(".__init__"), ast.parse(path.read_text())


def imports(tree: ast.Module) -> Iterator[tuple[str, str | None]]:
    """(imported module, the function it is imported in or None) for every import."""

    def walk(node: ast.AST, function: str | None) -> Iterator[tuple[str, str | None]]:
        for child in ast.iter_child_nodes(node):
            inner = (
                child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else None
            )
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                yield child.module, function
                for alias in child.names:  # `from offline_queue.store import claims`
                    yield f"{child.module}.{alias.name}", function
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, function
            yield from walk(child, inner or function)

    yield from walk(tree, None)


def ours(name: str) -> str | None:
    if not name.startswith("offline_queue."):
        return None
    return name.removeprefix("offline_queue.")


def allowed(target: str, part: str) -> bool:
    return any(target == r or target.startswith(r + ".") for r in ALLOWED[part])


def test_each_part_imports_only_the_parts_below_it() -> None:
    wrong = []
    for name, tree in modules():
        part = part_of(name)
        for imported, function in imports(tree):
            target = ours(imported)
            if target is None:
                prefect = imported.split(".")[0] == "prefect"
                if part in ALLOWED and prefect and (name, function) not in PREFECT_EXCEPTIONS:
                    wrong.append(f"{name} imports {imported} (Prefect below blocks/)")
                continue
            target_part = part_of(target)
            if target_part == "cli" and part != "cli":
                wrong.append(f"{name} imports {target} (nothing imports cli/)")
            elif target_part in {"api", "pools"} and part not in {"cli", target_part}:
                wrong.append(f"{name} imports {target} (only cli/ imports {target_part}/)")
            elif target_part == "flows" and part not in {"api", "cli", "flows"}:
                wrong.append(f"{name} imports {target} (only api/ and cli/ import flows/)")
            elif part in ALLOWED and target_part in UPPER:
                wrong.append(f"{name} imports {target} ({part} is below {target_part}/)")
            elif part in ALLOWED and not allowed(target, part):
                wrong.append(f"{name} ({part}) imports {target}")
    assert wrong == []


def test_the_checker_sees_an_import_inside_a_function() -> None:
    tree = ast.parse("def f():\n    from offline_queue.flows.batch import batch_inference\n")
    assert ("offline_queue.flows.batch", "f") in set(imports(tree))
