"""The catalog: a line naming a model nobody serves, another model, or an endpoint its model
does not serve is an error of its own; the good lines are accepted."""

from __future__ import annotations

from pathlib import Path

from offline_queue.catalog import DEFAULT_CATALOG
from offline_queue.validate import Accepted, Limits, Rejected, validate_file


def _line(cid: str, model: str, url: str = "/v1/chat/completions") -> str:
    body = (
        f'{{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}]}}'
        if url == "/v1/chat/completions"
        else f'{{"model": "{model}", "prompt": "hi"}}'
    )
    return f'{{"custom_id": "{cid}", "method": "POST", "url": "{url}", "body": {body}}}'


def test_lines_must_name_one_served_model(tmp_path: Path) -> None:
    lines = [
        _line("a", "smollm2"),
        _line("b", "SmolLM2-135M-Instruct"),
        _line("c", "NonExistModel"),
        _line("d", "smollm2", "/v1/completions"),
        '{"custom_id": "e", "method": "POST", "url": "/v1/bad", "body": {}}',
        '{"custom_id": "f", "method": "POST", "url": "/v1/chat/completions", "body": '
        '{"model": "smollm2", "stream": "True", "messages": [{"role": "user", "content": "x"}]}}',
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines))  # no final newline, as vLLM's run-batch test input
    items = list(validate_file(path, Limits(), catalog=DEFAULT_CATALOG))
    ok = {i.custom_id for i in items if isinstance(i, Accepted)}
    bad = {i.custom_id: i.error.message for i in items if isinstance(i, Rejected)}
    assert ok == {"a", "b", "d"}
    assert bad["c"] == "line 3: model: 'NonExistModel' is not served; served models: smollm2"
    assert "unsupported url" in bad["e"]
    assert "stream" in bad["f"]


def test_without_catalog_model_is_not_checked(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(_line("c", "NonExistModel") + "\n")
    assert isinstance(next(validate_file(path, Limits())), Accepted)
