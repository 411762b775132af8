"""The `data` section: where questions come from (files or globs, Hugging Face datasets, the demo world),
how a layout kdflow does not know maps its columns, stratified subsampling, each source's dataset name,
and the train/val/test split fractions.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from kdflow.config.base import Strict


class GenericMapping(Strict):
    """Column names for a layout kdflow does not know; answers may be an index, a letter or option text."""

    question: str = Field("question", description="column holding the question text")
    options: list[str] | str = Field(
        "options", description="one column holding a list of options, or a list of columns, one per option"
    )
    answer: str = Field("answer", description="column holding the answer")
    answer_type: Literal["auto", "index", "letter", "text"] = Field(
        "auto",
        description="how the answer column is written; auto decides once for the whole column from all its "
        "values and the options, and refuses the source when the values fit two readings that disagree",
    )
    answer_base: Literal[0, 1] | None = Field(
        None,
        description="for an index answer: 0 (first option is 0) or 1 (first option is 1); default: from the values",
    )
    passage: str | None = Field(
        None, description="column holding a passage or context shown before the question (e.g. a reading article)"
    )
    id: str | None = Field(None, description="column holding a stable question id (else a content hash)")
    category: str | None = Field(None, description="column holding the category or subject")


class DemoSource(Strict):
    """The generated offline question world (kdflow/data/demo.py): the student's transfer set, or the teacher's
    own questions about the same world."""

    n_questions: int = Field(
        15_000, ge=100, description="size of the transfer set; it also fixes the world (how many facts each tier has)"
    )
    seed: int = Field(0, description="generator seed; the same seed gives the same world everywhere")
    corpus: Literal["transfer", "teacher"] = Field(
        "transfer",
        description="transfer: the questions the student learns from; teacher: the teacher's own questions about "
        "the same world (its 'pretraining', for teacher.prepare.source), every answer right",
    )
    labeled_share: float = Field(
        0.7, ge=0, le=1,
        description="transfer set: share of the topics (facts; reasoning questions one by one) whose training "
        "questions have a gold answer; the others are unlabeled and teach the student only through the teacher's "
        "soft label, as a pool of production questions nobody annotated does. Validation and test questions keep "
        "their gold answers",
    )
    gold_noise: float = Field(
        0.05, ge=0, le=1,
        description="transfer set: share of gold answers replaced by a wrong option, marked in the metadata "
        "(MMLU-Redux finds about 6.5% of MMLU questions in error; Northcutt et al. 2021 at least 3.3% across 10 "
        "common test sets)",
    )


class SampleConfig(Strict):
    """A reproducible subsample of a source, stratified by category."""

    size: int = Field(..., ge=1, description="how many questions to keep (all of them when the source has fewer)")
    seed: int = Field(0, description="the same seed keeps the same questions on every machine")


class SourceConfig(Strict):
    """One place questions come from: a file (or glob), a Hugging Face dataset id, or the demo world."""

    name: str | None = Field(
        None,
        description="dataset name; default: the path relative to the sources' common folder without the "
        "extension (easy/test, challenge/test), the hub id with subset and split (cais__mmlu__all__test), or 'demo'",
    )
    path: str | None = Field(
        None, description="a .jsonl/.json/.csv/.parquet file or a glob of them; written in a config file, a relative "
        "path is relative to the file's folder (in --set, to the working directory)",
    )
    hf_dataset: str | None = Field(None, description="Hugging Face dataset id, e.g. cais/mmlu")
    hf_subset: str | None = Field(None, description="dataset configuration name, e.g. 'all'")
    hf_split: str | None = Field(None, description="dataset split to read, e.g. 'test'")
    demo: DemoSource | None = Field(None, description="generate the offline demo world")
    # The layouts are the ingest stage's (kdflow.ingest.layouts.LAYOUTS), which the config may not import:
    # the name is checked when the source is read, before anything is stored, naming this setting.
    format: str = Field(
        "auto", description="source layout: auto detects it from the first rows; or a layout of "
        "docs/input-formats.md (generic reads the columns through `mapping`)",
    )
    mapping: GenericMapping | None = Field(None, description="column mapping for format: generic")
    encoding: str = Field(
        "auto",
        description="text encoding of the files; auto reads a BOM (UTF-8, UTF-16, UTF-32), else UTF-8, else "
        "detects a single-byte Western encoding (cp1252/Latin-1) and reports it; or a Python codec name",
    )
    sample: SampleConfig | None = Field(None, description="keep a stratified subsample of this source")
    allow_unlabeled: bool = Field(
        False,
        description="keep a row whose answer is missing, null or blank as an unlabeled question (always in "
        "split train: the student learns the teacher's soft label alone) instead of rejecting it; an answer "
        "that is present but names no option is still rejected. Demo sources always keep unlabeled questions",
    )
    _default_name: str | None = PrivateAttr(None)
    _position: int | None = PrivateAttr(None)
    # Command-line options that set this source's keys, for a source given on the command line (kdflow ingest
    # PATHS): messages name the option the user can type there.
    _options: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _one_origin(self) -> SourceConfig:
        given = [k for k in ("path", "hf_dataset", "demo") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a source needs exactly one of path, hf_dataset or demo; got {given or 'none'}")
        if self.format == "generic" and self.mapping is None:
            raise ValueError("format: generic needs a mapping (question, options, answer columns)")
        return self

    @field_validator("encoding")
    @classmethod
    def _known_codec(cls, encoding: str) -> str:
        # A field check, so the error names the field (or --encoding in `kdflow ingest`).
        if encoding != "auto":
            try:
                codecs.lookup(encoding)
            except LookupError:
                raise ValueError(f"encoding {encoding!r} is not a known codec (e.g. utf-8, utf-16, cp1252)") from None
        return encoding

    @property
    def display_name(self) -> str:
        """The dataset name: `name`, else the default DataConfig derived from all sources, else from this one."""
        if self.name:
            return self.name
        if self._default_name:
            return self._default_name
        if self.demo is not None:
            return "demo"
        if self.hf_dataset is not None:
            parts = [self.hf_dataset.replace("/", "__"), self.hf_subset, self.hf_split]
            return "__".join(p for p in parts if p)
        return _anchor(str(self.path)).name

    def setting(self, key: str) -> str:
        """Where a key of this source is set: data.sources[2].allow_unlabeled (data.sources[] when the
        source is not part of a DataConfig)."""
        return f"data.sources[{'' if self._position is None else self._position}].{key}"

    def given_on_command_line(self, options: dict[str, str]) -> SourceConfig:
        """This source, its messages naming `options` ({key: command-line option}) instead of config keys."""
        self._options = dict(options)
        return self

    def enabling(self, key: str) -> str:
        """How to turn the boolean `key` on: its command-line option for a source given there, else
        `data.sources[i].key: true`."""
        return self._options.get(key) or f"{self.setting(key)}: true"


def _anchor(pattern: str) -> Path:
    """A file source's path without its extension, or a glob's folder before its first wildcard."""
    parts = Path(os.path.expanduser(pattern)).parts
    wild = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), None)
    if wild is not None:
        return Path(*parts[:wild]) if wild else Path(".")
    path = Path(*parts)
    return path.with_suffix("") if path.suffix else path


def default_source_names(sources: list[SourceConfig]) -> list[str]:
    """Dataset names of sources without a `name`: file paths relative to the common folder of all file
    sources, without the extension (data/easy/test.jsonl + data/challenge/test.jsonl -> easy/test and
    challenge/test), so two files that share a name never share a dataset."""
    anchors = {i: Path(os.path.abspath(_anchor(str(s.path)))) for i, s in enumerate(sources) if s.path is not None}
    common = Path(os.path.commonpath([a.parent for a in anchors.values()])) if anchors else Path(".")
    names = []
    for i, source in enumerate(sources):
        if i in anchors:
            relative = anchors[i].relative_to(common).as_posix()
            names.append(relative if relative != "." else anchors[i].name)
        else:
            names.append(source.display_name)
    return names


class SplitConfig(Strict):
    """Fractions for the stable hash-based train/val/test assignment: a question's split follows from a hash of
    its normalised text and sorted options alone, so it is the same in every source, run and machine.
    Unlabeled questions (no gold answer, see SourceConfig.allow_unlabeled) are always in train."""

    train: float = Field(
        0.7, ge=0, le=1,
        description="share the student (and a prepared teacher) train on; unlabeled questions are always here, "
        "as val and test need gold answers",
    )
    val: float = Field(
        0.1, ge=0, le=1, description="share for periodic checks, calibration, the teacher-accuracy floor and tau"
    )
    test: float = Field(0.2, ge=0, le=1, description="share held out for the final evaluation; the three sum to 1")

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {total:g}")
        return self


def _default_sources() -> list[SourceConfig]:
    return [SourceConfig(demo=DemoSource())]


class DataConfig(Strict):
    """The sources of a run (each its own dataset) and the split fractions."""

    # A default_factory leaves the JSON schema without a default, and the Prefect UI's run form then showed
    # "Sources: No items in this list" although the demo world is used: the schema names it.
    sources: list[SourceConfig] = Field(
        default_factory=_default_sources,
        description="each source becomes its own dataset; two sources with one name are refused "
        "(default: the generated demo world)",
        json_schema_extra={"default": [s.model_dump(mode="json", exclude_none=True) for s in _default_sources()]},
    )
    splits: SplitConfig = Field(default_factory=SplitConfig, description="train/val/test fractions")

    @model_validator(mode="after")
    def _distinct_names(self) -> DataConfig:
        for i, (source, name) in enumerate(zip(self.sources, default_source_names(self.sources), strict=True)):
            source._default_name = None if source.name else name
            source._position = i
        seen: dict[str, int] = {}
        for i, source in enumerate(self.sources):
            name = source.display_name
            if name in seen:
                j = seen[name]
                raise ValueError(
                    f"sources {j + 1} ({_origin(self.sources[j])}) and {i + 1} ({_origin(source)}) would both be "
                    f"dataset {name!r}; give each a distinct `name` in data.sources[]"
                )
            seen[name] = i
        return self


def _origin(source: SourceConfig) -> str:
    return source.path or source.hf_dataset or "demo"
