"""The model version keys the result cache: different weights must get different versions, the
same weights the same one wherever the folder lives, and computing it must stay cheap."""

from __future__ import annotations

import json
import re
import shutil
import struct
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from offline_queue.model import model_version

CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "num_hidden_layers": 2}


def tiny_model(
    root: Path, seed: int, name: str = "tiny", changed: str | None = None, **files: str
) -> Path:
    """A model folder of fixed shapes; `seed` picks the weights (or, with `changed`, only that
    tensor's: a fine-tune that trained one layer)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    for file, text in files.items():
        (folder / file).write_text(text)
    names = ["embed_tokens.weight", "layers.0.mlp.weight", "layers.1.mlp.weight", "norm.weight"]
    tensors = {}
    for i, tensor in enumerate(names):
        rng = np.random.default_rng(seed if changed in (None, tensor) else 1000 + i)
        shape = (8,) if tensor == "norm.weight" else (64, 8)
        tensors[tensor] = rng.standard_normal(shape).astype(np.float32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_the_version_has_the_folder_name_and_twelve_hex(tmp_path: Path) -> None:
    assert re.fullmatch(r"tiny@[0-9a-f]{12}", model_version(tiny_model(tmp_path, 1)))


def test_two_fine_tunes_of_one_shape_in_folders_of_one_name_differ(tmp_path: Path) -> None:
    a = model_version(tiny_model(tmp_path / "a", seed=1))
    b = model_version(tiny_model(tmp_path / "b", seed=2))
    assert a.split("@")[0] == b.split("@")[0] == "tiny"
    assert a != b
    # Only one layer trained, everything else the same bytes: still another version.
    one_layer = model_version(tiny_model(tmp_path / "c", seed=2, changed="layers.1.mlp.weight"))
    base = model_version(tiny_model(tmp_path / "d", seed=1000 + 2, changed="x"))
    assert one_layer != base


def test_the_same_folder_copied_elsewhere_keeps_its_version(tmp_path: Path) -> None:
    original = tiny_model(tmp_path / "here", seed=1)
    copy = shutil.copytree(original, tmp_path / "elsewhere" / "deeper" / "tiny")
    assert model_version(copy) == model_version(original)
    assert model_version(original) == model_version(original)  # deterministic


def test_tokenizer_and_chat_template_are_part_of_the_version(tmp_path: Path) -> None:
    plain = model_version(tiny_model(tmp_path / "a", seed=1))
    template = model_version(tiny_model(tmp_path / "b", seed=1, **{"chat_template.jinja": "{{x}}"}))
    other = model_version(tiny_model(tmp_path / "c", seed=1, **{"chat_template.jinja": "{{y}}"}))
    assert len({plain, template, other}) == 3
    config = tiny_model(tmp_path / "d", seed=1)
    (config / "config.json").write_text(json.dumps({**CONFIG, "rope_theta": 1.0}))
    assert model_version(config) != plain


def test_other_weight_formats_are_sampled_too(tmp_path: Path) -> None:
    versions = set()
    for seed in (1, 2):
        folder = tmp_path / str(seed) / "bin-model"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(CONFIG))
        data = np.random.default_rng(seed).standard_normal(4096).astype(np.float32).tobytes()
        (folder / "pytorch_model.bin").write_bytes(data)
        versions.add(model_version(folder))
    assert len(versions) == 2


def test_a_hub_snapshot_declares_its_revision(tmp_path: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / commit
    folder = tiny_model(snapshot.parent, seed=1, name=commit)
    assert model_version(folder) == "SmolLM2-135M@0123456789ab"


def test_a_huge_weight_file_costs_a_few_reads_not_a_pass(tmp_path: Path) -> None:
    """A 4 GiB tensor (a sparse file: no disk used) is versioned in milliseconds."""
    folder = tmp_path / "huge"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    size = 4 << 30
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}}
    ).encode()
    with (folder / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + size)
    started = time.perf_counter()
    before = model_version(folder)
    assert time.perf_counter() - started < 0.5
    with (folder / "model.safetensors").open("r+b") as f:  # one value in the middle changes
        f.seek(8 + len(header) + size // 2)
        f.write(b"\x01")
    assert model_version(folder) != before
