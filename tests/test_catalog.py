"""The catalog: a line naming a model nobody serves, another model, or an endpoint its model
does not serve is an error of its own; the good lines are accepted."""

from __future__ import annotations

from pathlib import Path

from offline_queue.catalog import DEFAULT_CATALOG
from offline_queue.findings import Accepted, Rejected
from offline_queue.validate import Limits, validate_file


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
    assert bad["c"] == (
        "line 3: model: 'NonExistModel' is not served; served models: smollm2, all-minilm-l6-v2"
    )
    assert "unsupported url" in bad["e"]
    assert "stream" in bad["f"]


def test_without_catalog_model_is_not_checked(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(_line("c", "NonExistModel") + "\n")
    assert isinstance(next(validate_file(path, Limits())), Accepted)


def test_an_embedding_line_in_a_chat_batch_and_a_chat_line_on_the_embedding_model(
    tmp_path: Path,
) -> None:
    embed = (
        '{"custom_id": "e", "method": "POST", "url": "/v1/embeddings", '
        '"body": {"model": "all-minilm-l6-v2", "input": "x"}}'
    )
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([_line("a", "smollm2"), embed, _line("b", "all-MiniLM-L6-v2")]))
    items = list(validate_file(path, Limits(), catalog=DEFAULT_CATALOG))
    bad = {i.custom_id: i.error.message for i in items if isinstance(i, Rejected)}
    assert "another model than the batch's (smollm2)" in bad["e"]
    assert bad["b"] == (
        "line 3: url: all-minilm-l6-v2 does not serve /v1/chat/completions; "
        "it serves /v1/embeddings"
    )


def test_the_batch_model_is_the_first_line_naming_a_served_model_and_is_kept(
    tmp_path: Path,
) -> None:
    from offline_queue.catalog import Catalog, ServedModel
    from offline_queue.validate import inspect_file

    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([_line("x", "gpt-4o-mini"), _line("a", "SmolLM2-135M-Instruct")]))
    assert DEFAULT_CATALOG.batch_model(inspect_file(path, Limits()).named) == DEFAULT_CATALOG.find(
        "smollm2"
    )
    # a saved entry gives a hosted model's name to the team's model, in place of the bundled one
    ours = ServedModel(name="smollm2", aliases=("gpt-4o-mini",), engine="http://gpu-1:8000/v1")
    catalog = DEFAULT_CATALOG.with_entries([ours])
    assert [m.name for m in catalog.models] == ["smollm2", "all-minilm-l6-v2"]
    assert catalog.batch_model(inspect_file(path, Limits()).named) == ours
    # what a batch keeps is what a resumed ingest judges by
    kept = Catalog.from_json(catalog.to_json())
    assert kept == catalog and kept.find("gpt-4o-mini") == ours
    assert kept.check("/v1/chat/completions", "SmolLM2-135M-Instruct", ours) is not None
