"""The starter config `kdflow init` writes: the settings a user's own run is about (their questions, their
teacher and student, the scoring mode, the KD loss, the gate's accuracy floor), each with its field's
description from the models above it as a comment, so the file explains itself and cannot drift from the
code. Values not chosen by a flag are the models' defaults.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from kdflow.config.base import ConfigError, section_model
from kdflow.config.run import RunConfig

WIDTH = 110  # columns of the comment lines
HEADER = """\
# A kdflow run configuration, written by `kdflow init`. Run the whole pipeline on it with
#   kdflow run -c {file}
# Each setting is explained above it. A setting left out takes its default, and
# `kdflow run -c {file} --set section.key=value` changes one for a single run.
# A question file's relative path is relative to this file's folder.
"""


def _default(model: type[BaseModel], key: str) -> Any:
    return model.model_fields[key].get_default(call_default_factory=True)


def _defaults(model: type[BaseModel], *keys: str) -> dict[str, Any]:
    return {key: _default(model, key) for key in keys}


def _teacher(model: str | None, url: str | None, served_name: str | None) -> dict[str, Any]:
    """The teacher section: a model run in this process (hf), a server's model (openai), or none given: a
    small teacher built fresh and trained on the training split, enough to try the pipeline offline."""
    section = RunConfig.model_fields["teacher"].annotation
    if url is not None:
        if not (served_name or model):
            raise ConfigError("--teacher-url needs --teacher-model: the model name the server serves")
        openai = section_model(section.model_fields["openai"].annotation)
        return {"backend": "openai", "model": served_name or model,
                "openai": {"base_url": url, **_defaults(openai, "api_key_env", "concurrency")}}
    if served_name is not None:
        raise ConfigError("--teacher-model names the model a server serves: give the server with --teacher-url")
    prepare = section_model(section.model_fields["prepare"].annotation)
    return {"backend": "hf", "model": model, **_defaults(section, "device", "batch_size"),
            **({"prepare": _defaults(prepare, "enabled")} if model is not None else {})}


def _student(model: str | None, teacher: dict[str, Any]) -> dict[str, Any]:
    """The student section: the model given, else every other layer of a teacher whose weights are here
    (hf), else a small model built fresh."""
    section = RunConfig.model_fields["student"].annotation
    lora = section_model(section.model_fields["lora"].annotation)
    if model is not None:
        start: dict[str, Any] = {"init": "pretrained", "model": model}
    elif teacher["backend"] == "hf" and teacher["model"] is not None:
        start = {"init": "from_teacher", **_defaults(section, "layer_stride")}
    else:
        architecture = _default(section, "architecture")
        start = {"init": "fresh", "architecture": {"hidden_size": architecture.hidden_size,
                                                   "num_layers": architecture.num_layers}}
    return {**start, **_defaults(section, "device"), "lora": _defaults(lora, "enabled")}


def starter_values(
    data: str,
    *,
    name: str,
    teacher: str | None = None,
    teacher_url: str | None = None,
    teacher_model: str | None = None,
    student: str | None = None,
    scoring: Literal["letter", "cloze"] = "letter",
) -> dict[str, Any]:
    """The starter's settings as nested dicts in the order they are written; raises ConfigError naming
    the flag when the choices do not fit together or fail the config's checks."""
    fields = RunConfig.model_fields
    teacher_section = _teacher(teacher, teacher_url, teacher_model)
    values = {
        "name": name,
        "data": {"sources": [{"path": data, "format": "auto"}],
                 "splits": _default(fields["data"].annotation, "splits").model_dump()},
        "scoring": {"mode": scoring, **_defaults(fields["scoring"].annotation, "chat_template")},
        "teacher": teacher_section,
        "student": _student(student, teacher_section),
        "training": _defaults(fields["training"].annotation, "alpha", "temperature", "epochs", "batch_size",
                              "learning_rate"),
        "validation": _defaults(fields["validation"].annotation, "min_teacher_accuracy"),
        "evaluation": _defaults(fields["evaluation"].annotation, "max_questions"),
    }
    try:
        RunConfig.model_validate(values)
    except ValidationError as e:
        raise ConfigError("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None
    return values


def flow_yaml(value: Any) -> str:
    """A value as YAML writes it in one line of flow style, quoted only where YAML needs it (a text with line
    breaks double-quoted with \\n escapes); a section as the settings it was given."""
    if isinstance(value, str) and "\n" in value:
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_none=True)
    elif isinstance(value, list) and any(isinstance(v, BaseModel) for v in value):
        value = [v.model_dump(mode="json", exclude_none=True) for v in value]
    return yaml.safe_dump([value], default_flow_style=True, width=10**9).strip()[1:-1]


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(" ".join(text.split()), WIDTH - len(indent) - 2)]


def _lines(values: dict[str, Any], model: type[BaseModel], depth: int) -> list[str]:
    """YAML lines of `values` (settings of `model`), each key after its field's description as a comment."""
    indent = "  " * depth
    out: list[str] = []
    for key, value in values.items():
        field = model.model_fields[key]
        out += _comment(field.description or "", indent)
        if isinstance(value, dict):
            out += [f"{indent}{key}:", *_lines(value, section_model(field.annotation), depth + 1)]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            out.append(f"{indent}{key}:")
            for item in value:
                item_lines = _lines(item, section_model(field.annotation), depth + 2)
                first = next(i for i, line in enumerate(item_lines) if not line.lstrip().startswith("#"))
                # The item's first key opens it with "- ", its comment above the dash.
                out += [line[2:] for line in item_lines[:first]]
                out += [f"{indent}  - {item_lines[first].lstrip()}", *item_lines[first + 1:]]
        else:
            out.append(f"{indent}{key}: {flow_yaml(value)}")
    return out


def starter_config(values: dict[str, Any], file_name: str) -> str:
    """The commented YAML text of starter_values(...), for a file named `file_name`: sections apart, each
    key under its description."""
    out = [HEADER.format(file=file_name)]
    for key, value in values.items():
        out.append("\n".join(_lines({key: value}, RunConfig, 0)) + "\n")
    return "\n".join(out)
