"""Cheap content fingerprints for cache keys (no torch import: the CLI computes keys before loading models)."""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHT_SUFFIXES = {".safetensors", ".gguf", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".tiktoken"}


def weights_fingerprint(path: str | Path) -> str | None:
    """A short hash of a local model's weight, config and tokenizer files; None when `path` is not local.

    `path` is a model directory (its top-level files count) or one weights file (a .gguf). Each file adds
    its name, size, modification time (ns) and first MiB (the safetensors/GGUF header, which lists every
    tensor's name, shape and offset, and the first tensors' bytes): other weights copied into the same
    directory, or a model retrained in place, change it, while a 100 GB checkpoint is not read in full.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        files = [f for f in sorted(path.glob("*")) if f.suffix in WEIGHT_SUFFIXES and f.is_file()]
    elif path.is_file():
        files = [path]
    else:
        return None
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


# A model directory's weight files: never read by a tokenizer, and too big to hash whole.
_WEIGHTS = {".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx"}


def tokenizer_fingerprint(path: str | Path) -> str | None:
    """A hash of the contents of every top-level file of a model directory but its weights: two directories
    with the same one tokenize alike (the tokenizer files, and config.json, whose model type can decide the
    tokenizer class transformers loads); any other file in them only makes the hashes differ. None when
    `path` is not a directory."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(path.glob("*")):
        if file.is_file() and file.suffix not in _WEIGHTS:
            digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
            with file.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()[:16]
