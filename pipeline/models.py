"""Every stage loads its base model and tokenizer here (hub id, local folder, GGUF file), so
``trust_remote_code`` (only when configured) and safetensors-only hold everywhere. A GGUF file is
de-quantised once (tens of seconds) into a safetensors folder cached by its content digest."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import struct
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from pipeline.digests import file_digest

if TYPE_CHECKING:
    from pipeline.config import ModelConfig

PACKAGE_SCHEME = "pkg://"


def cache_root() -> Path:
    """Where converted checkpoints live: ``$UORA_PIPELINE_CACHE`` or ``~/.cache/uora-pipeline``."""
    return Path(os.environ.get("UORA_PIPELINE_CACHE", Path.home() / ".cache" / "uora-pipeline"))


def resolve_package_dir(name_or_path: str) -> str:
    """Map ``pkg://<package>`` to the installed package's folder without importing the package."""
    if not name_or_path.startswith(PACKAGE_SCHEME):
        return name_or_path
    spec = importlib.util.find_spec(package := name_or_path.removeprefix(PACKAGE_SCHEME))
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model.name_or_path: Python package {package!r} is not installed")
    return str(spec.submodule_search_locations[0])


def hub_model_id(config: ModelConfig) -> str | None:
    """The hub id ``config`` names, or None for a local folder or a ``pkg://`` package."""
    location = config.name_or_path
    return None if location.startswith(PACKAGE_SCHEME) or Path(location).exists() else location


def hub_cached(repo_id: str, revision: str | None = None) -> bool:
    """Whether the Hugging Face cache holds ``repo_id``'s config.json (no network, no torch)."""
    from huggingface_hub import try_to_load_from_cache  # here: validate imports this module, keep it light

    return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)


def hub_preflight(models: dict[str, ModelConfig]) -> str | None:
    """One probe of the hub before a run needs it (``models``: config field → model). If it fails: offline
    mode for this process and its workers (cached weights load at once, not after a minute of retries),
    and the line to fail with for weights not cached. Not for local weights or under ``*_OFFLINE``."""
    repos = {field: (m.name_or_path, m.revision) for field, m in models.items() if hub_model_id(m)}
    offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if not repos or offline.lower() in ("1", "true", "yes", "on"):
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=5).close()
        return None
    except urllib.error.HTTPError:  # it answered
        return None
    except OSError as error:  # URLError, timeouts, DNS
        reason = getattr(error, "reason", error)
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    for module in {"huggingface_hub.constants", "datasets.config"} & sys.modules.keys():  # read at import
        sys.modules[module].HF_HUB_OFFLINE = True
    for field, (repo, revision) in repos.items():
        if not hub_cached(repo, revision):
            return (f"{field}.name_or_path: {repo} is not in the local Hugging Face cache and the hub "
                    f"({endpoint}) is unreachable ({reason}); download it where the hub is reachable, or "
                    "point HF_HUB_CACHE at a cache that has it")  # fmt: skip
    return None


def checkpoint_digest(path: Path) -> str:
    """``file_digest`` of a checkpoint, once per process while inode, size and mtime are unchanged
    (checkpoints are replaced, not edited): every stage resolves its model several times."""
    stat = path.stat()
    return _memo_digest(str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _memo_digest(path: str, inode: int, size: int, mtime_ns: int) -> str:
    return file_digest(path)


def convert_gguf(directory: str, gguf_file: str) -> Path:
    """Convert ``directory/gguf_file`` to a safetensors + tokenizer folder, once per content digest;
    safe for concurrent ranks (a file lock, and an atomic rename of the complete folder)."""
    source = Path(directory) / gguf_file
    if not source.is_file():
        raise FileNotFoundError(f"model.gguf_file: {source} does not exist")
    target = cache_root() / "gguf" / f"{source.stem}-{checkpoint_digest(source)[:16]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder := str(source.parent), gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=source.name, dtype=torch.float32)
        # The de-quantised weights are plain float tensors: drop the GGUF marker to save them as such.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with tempfile.TemporaryDirectory(prefix=target.name + ".", dir=target.parent,
                                         ignore_cleanup_errors=True) as staging:  # fmt: skip
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            os.rename(staging, target)
    return target


def resolve_model_dir(config: ModelConfig) -> str:
    """The hub id or local folder that ``from_pretrained`` should read for this config."""
    location = resolve_package_dir(config.name_or_path)
    return str(convert_gguf(location, config.gguf_file)) if config.gguf_file else location


def base_model_card(config: ModelConfig) -> dict[str, str]:
    """``base_model`` (hub id) and ``license`` for a model card, read offline, where known: a hub id as
    configured with its cached card's licence; a GGUF file as ``<general.organization>/<file name less
    its quantisation suffix>`` with its metadata's licence; a local folder: nothing."""
    if config.gguf_file:
        meta = gguf_general_metadata(Path(resolve_package_dir(config.name_or_path)) / config.gguf_file)
        name = re.sub(r"[.-](?:I?Q\d\w*|B?F16|F32)$", "", Path(config.gguf_file).stem, flags=re.IGNORECASE)
        card = {"base_model": f"{meta['organization']}/{name}" if "organization" in meta else None}
        return {key: value for key, value in {**card, "license": meta.get("license")}.items() if value}
    if (location := hub_model_id(config)) is None:
        return {}
    from huggingface_hub import ModelCard, try_to_load_from_cache

    readme = try_to_load_from_cache(location, "README.md", revision=config.revision)
    licence = ModelCard.load(readme).data.license if isinstance(readme, str) else None
    return {"base_model": location, **({"license": licence} if licence else {})}


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_general_metadata(path: Path) -> dict[str, Any]:
    """The ``general.*`` string and number values at the head of a GGUF file (``organization``,
    ``license``, ...), read directly: ``gguf.GGUFReader`` parses the whole vocabulary first (~30 s
    for SmolLM2's). GGUF v2+ layout: magic, version, tensor and key counts, then typed key/values."""
    found: dict[str, Any] = {}
    with open(path, "rb") as handle:

        def read(fmt: str) -> Any:
            return struct.unpack("<" + fmt, handle.read(struct.calcsize(fmt)))[0]

        def text() -> str:
            return handle.read(read("Q")).decode("utf-8", "replace")

        if handle.read(4) != b"GGUF" or read("I") < 2:
            return found
        read("Q")
        for _ in range(read("Q")):
            key, kind = text(), read("I")
            if not key.startswith("general.") or kind == 9:  # general.* come first; arrays end the walk
                break
            found[key.removeprefix("general.")] = text() if kind == 8 else read(_GGUF_SCALARS[kind])
    return found


def read_chat_template(config: ModelConfig) -> str | None:
    """The configured chat template override: a path to a Jinja file, or the template text."""
    template = config.chat_template
    if template and "{" not in template and Path(template).is_file():
        return Path(template).read_text(encoding="utf-8")
    return template


def load_tokenizer(config: ModelConfig) -> Any:
    """The tokenizer, with the chat-template override applied and a pad token guaranteed."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(config), revision=config.revision,
                                              trust_remote_code=config.trust_remote_code)
    if (template := read_chat_template(config)) is not None:
        tokenizer.chat_template = template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: ModelConfig, *, quantize: bool | None = None, device_map: Any = None) -> Any:
    """The base causal LM in the configured dtype; 8-bit via bitsandbytes when ``quantize`` (default
    ``config.load_in_8bit``; export passes ``False`` to merge into full-precision weights)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    eight_bit = config.load_in_8bit if quantize is None else quantize
    return AutoModelForCausalLM.from_pretrained(
        resolve_model_dir(config), revision=config.revision, trust_remote_code=config.trust_remote_code,
        use_safetensors=True, dtype=getattr(torch, config.dtype), device_map=device_map,
        quantization_config=BitsAndBytesConfig(load_in_8bit=True) if eight_bit else None,
    )
