"""Where a model comes from, as users ship it: a hub id, a local directory, or a GGUF file.

Light on purpose (no torch or transformers import), so the pipeline can decide and check what to load
before paying for those imports; kdflow.modeling does the loading.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from kdflow.config import StudentConfig, TeacherConfig
from kdflow.errors import KdflowError


class ModelLoadError(KdflowError):
    """A model or tokenizer could not be loaded; the one-line message names it and says what to do."""


GGUF_PACKAGE = "gguf>=0.10"  # what transformers needs to read GGUF files (a kdflow dependency)


@dataclass(frozen=True)
class ModelSource:
    """A model as it is shipped: a hub id or a local directory, optionally one GGUF file in it.

    `gguf_file` is a file name inside `name_or_path` (a local directory or a hub repo) or a path of its
    own; `name_or_path` may also be the path of a .gguf file itself. GGUF weights are de-quantised on load
    into an ordinary model, so it trains and saves as safetensors. `setting` names the config section
    that gave it ("teacher", "student"), so a load error can say which key to change.
    """

    name_or_path: str
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    setting: str | None = None

    @property
    def is_local(self) -> bool:
        """A path (it exists, or is written like one) rather than a hub id."""
        return self.name_or_path.startswith((".", "/", "~")) or Path(self.name_or_path).expanduser().exists()

    @property
    def local_dir(self) -> Path | None:
        """The directory holding a local model (the .gguf file's directory when given a file); else None."""
        if not self.is_local:
            return None
        path = Path(self.name_or_path).expanduser().resolve()
        return path.parent if path.suffix == ".gguf" and path.is_file() else path

    def describe(self) -> str:
        """E.g. "teacher.model '/m' (teacher.gguf_file 'x.gguf')", for messages."""
        key = f"{self.setting}." if self.setting else ""
        text = f"{key}model {self.name_or_path!r}"
        if self.revision:
            text += f" at revision {self.revision}"
        if self.gguf_file:
            text += f" ({key}gguf_file {self.gguf_file!r})"
        return text


def configured_source(section: TeacherConfig | StudentConfig, setting: str) -> ModelSource:
    """The ModelSource a teacher or student config section names (`model`, `gguf_file`, `revision` ...)."""
    if section.model is None:
        raise ModelLoadError(f"{setting}.model is not set: give a hub id, a local directory or a .gguf file")
    return ModelSource(section.model, gguf_file=section.gguf_file, revision=section.revision,
                       trust_remote_code=section.trust_remote_code, setting=setting)


def load_args(source: ModelSource) -> tuple[str, str | None]:
    """(name_or_path, gguf_file) to hand to transformers; raises ModelLoadError for what is not there."""
    key = f"{source.setting}." if source.setting else ""
    name_or_path, gguf_file = source.name_or_path, source.gguf_file
    if source.is_local:
        path = Path(name_or_path).expanduser()
        if path.is_file():
            if path.suffix != ".gguf" or gguf_file:
                raise ModelLoadError(
                    f"cannot load {source.describe()}: {path} is a file; {key}model must be a model directory, a hub "
                    f"id or a .gguf file (or a directory, with {key}gguf_file naming the .gguf file inside it)"
                )
            name_or_path, gguf_file = str(path.resolve().parent), path.name
        elif not path.is_dir():
            raise ModelLoadError(
                f"cannot load {source.describe()}: directory {str(path)!r} does not exist; check {key}model, "
                "or give a Hugging Face hub id"
            )
        else:
            name_or_path = str(path)
            held = sorted(p.name for p in path.glob("*.gguf"))
            if gguf_file and not (path / gguf_file).is_file():
                if not Path(gguf_file).expanduser().is_file():
                    found = f"it holds {', '.join(held)}" if held else "it holds no .gguf file"
                    raise ModelLoadError(
                        f"cannot load {source.describe()}: no file {gguf_file!r} in {path} ({found}); "
                        f"set {key}gguf_file to the GGUF file's name"
                    )
                gguf_file = str(Path(gguf_file).expanduser())
            # A peft adapter directory names its base model in adapter_config.json instead.
            if not gguf_file and not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
                raise ModelLoadError(
                    f"cannot load {source.describe()}: {path} has no config.json but holds GGUF weights "
                    f"({', '.join(held)}); set {key}gguf_file: {held[0]}" if held else
                    f"cannot load {source.describe()}: {path} has no config.json; the directory needs config.json, "
                    "the weights and the tokenizer files (as save_pretrained writes them), or a .gguf file"
                )
    if gguf_file and importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(
            f"cannot load {source.describe()}: reading GGUF files needs the gguf package, which is not installed: "
            f"pip install '{GGUF_PACKAGE}'"
        )
    return name_or_path, gguf_file
