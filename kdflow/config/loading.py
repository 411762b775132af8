"""Reading a run configuration: a YAML file or a shipped config's name (default: demo) plus
`--set key.sub=value` overrides, validated into a RunConfig. Errors name where the value came from (the
--set, or file:line), the key and what is wrong, and suggest the closest key for a misspelt one.
"""

from __future__ import annotations

import difflib
import os
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kdflow.config.base import ConfigError, section_model
from kdflow.config.run import RunConfig


CONFIG_PACKAGE = "kdflow.configs"  # the repository's configs/ folder, wherever kdflow is installed
DEFAULT_CONFIG = "demo"  # the shipped config a command reads when given none


def shipped_configs() -> dict[str, Path]:
    """{name: file} of the configs shipped with kdflow (configs/*.yaml), named without the .yaml."""
    # An installed package is a folder on disk (pip never installs kdflow zipped): a config's relative
    # data paths need its real folder.
    found = (Path(entry) for entry in files(CONFIG_PACKAGE).iterdir() if entry.name.endswith(".yaml"))
    return {path.stem: path for path in sorted(found)}


def find_config(config: str | Path | None) -> Path:
    """The file `config` names: an existing file, else the shipped config of that name (`tiny` or
    `tiny.yaml`); None is the shipped DEFAULT_CONFIG. Raises ConfigError listing the shipped names when
    neither exists."""
    shipped = shipped_configs()
    if config is None:
        return shipped[DEFAULT_CONFIG]
    path = Path(config).expanduser()
    if path.exists():
        return path
    name = str(config).removesuffix(".yaml").removesuffix(".yml")
    if name not in shipped:
        raise ConfigError(
            f"cannot read config file {path}: no such file, and kdflow ships no config named {name!r} "
            f"(shipped: {', '.join(shipped)})"
        )
    return shipped[name]


def _sources_relative_to(data: dict[str, Any], folder: Path) -> None:
    """A relative `path` of a source written in a config file is relative to the file's folder, so a config
    and its questions move together (installed or not); `--set` paths stay relative to the working directory."""
    section = data.get("data")
    sources = section.get("sources") if isinstance(section, dict) else None
    for source in sources if isinstance(sources, list) else []:
        path = source.get("path") if isinstance(source, dict) else None
        if isinstance(path, str) and path and not os.path.isabs(os.path.expanduser(path)):
            source["path"] = os.path.normpath(folder / path)


def _parse_value(text: str) -> Any:
    """Override values are YAML scalars or flow collections (`3`, `true`, `[a, b]`, `null`); anything
    else, such as a prompt template containing ': ', stays the text it was."""
    if not text.strip():
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, (dict, list)) and not text.lstrip().startswith(("[", "{")):
        return text
    return value


_KEY_PART = re.compile(r"([^.\[\]]+)((?:\[\d+\])*)")


def _key_path(item: str) -> tuple[str | int, ...]:
    """The keys of an override's `key`: `data.sources[0].path` is ('data', 'sources', 0, 'path'), a list
    item named by its 0-based index. Raises ConfigError for a key of another form."""
    key = item.partition("=")[0].strip()
    path: list[str | int] = []
    for part in key.split("."):
        match = _KEY_PART.fullmatch(part.strip())
        if match is None:
            raise ConfigError(f"--set {item!r}: {part!r} is not a key; write section.key or list[0].key")
        path.append(match[1])
        path += [int(index) for index in re.findall(r"\d+", match[2])]
    return tuple(path)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides to raw config data (before validation); `sources[0].key` sets a key
    of one item of a list the config already has."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not of the form key.sub=value")
        parts = _key_path(item)
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            if isinstance(part, int):
                _check_index(item, node, part, parts[:depth])
                child = node[part]
            else:
                if not isinstance(node, dict):
                    named = _dotted(parts[:depth])
                    raise ConfigError(f"--set {item!r}: {named} is a list: name an item, {named}[0]")
                child = node.get(part)
                if child is None and not isinstance(parts[depth + 1], int):
                    child = node[part] = {}
                elif child is None:
                    child = node[part] = _default_list(item, parts[: depth + 1])
            if not isinstance(child, (dict, list)):
                if isinstance(parts[depth + 1], int):
                    raise ConfigError(f"--set {item!r}: {_dotted(parts[: depth + 1])} is not a list")
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node = child
        last = parts[-1]
        if isinstance(last, int):
            _check_index(item, node, last, parts[:-1])
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {_dotted(parts[:-1])} is a list: name an item")
        node[last] = _parse_value(value)
    return data


def _check_index(item: str, node: Any, index: int, loc: tuple[str | int, ...]) -> None:
    """ConfigError unless `node` (the value at `loc`) is a list with an item `index`."""
    if not isinstance(node, list):
        raise ConfigError(f"--set {item!r}: {_dotted(loc) or 'the config'} is not a list")
    if index >= len(node):
        raise ConfigError(f"--set {item!r}: {_dotted(loc)} has {len(node)} item(s), numbered from 0")


def _default_list(item: str, loc: tuple[str | int, ...]) -> list[Any]:
    """The default of the list setting at `loc`, as raw config data, for a --set that names one of its items
    when the config does not write the list. ConfigError for a key its section does not have."""
    section = _model_at(loc[:-1])
    field = section.model_fields.get(str(loc[-1])) if section is not None else None
    if field is None:
        raise ConfigError(f"--set {item!r}: {_dotted(loc)}: unknown key{_suggestion(loc)} (docs/configuration.md "
                          "lists every key)")
    default = field.get_default(call_default_factory=True)
    if not isinstance(default, list):
        raise ConfigError(f"--set {item!r}: {_dotted(loc)} is not a list")
    return [v.model_dump(mode="json", exclude_none=True) if isinstance(v, BaseModel) else v for v in default]


def _key_lines(node: yaml.Node | None, prefix: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    """{key path: 1-based line} of every key and list item in a composed YAML document."""
    lines: dict[tuple[Any, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, key_node.value)
            lines[path] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*prefix, index)] = item.start_mark.line + 1
            lines.update(_key_lines(item, (*prefix, index)))
    return lines


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config section (pydantic model) a location path points into, or None past the models."""
    model: Any = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = section_model(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _dotted(loc: tuple[Any, ...]) -> str:
    """A location as a --set key names it: ('data', 'sources', 0, 'path') is data.sources[0].path."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _suggestion(loc: tuple[Any, ...]) -> str:
    """'; did you mean a.b?' for a misspelt key, from the keys its section does have (difflib)."""
    section = _model_at(loc[:-1])
    if section is None or not isinstance(loc[-1], str):
        return ""
    close = difflib.get_close_matches(loc[-1], list(section.model_fields), n=1, cutoff=0.6)
    if not close:
        return ""
    return f"; did you mean {_dotted((*loc[:-1], close[0]))}?"


def _value_origin(loc: tuple[Any, ...], overrides: list[str], lines: dict[tuple[Any, ...], int], path: str) -> str:
    """Where a value at `loc` came from: the last --set that wrote it or a section holding it, else the
    file line of the deepest key given there, else the file (a default value)."""
    for item in reversed(overrides):
        keys = _key_path(item)
        # A key without list indices names every item of the lists on its path.
        named = loc if any(isinstance(k, int) for k in keys) else tuple(p for p in loc if not isinstance(p, int))
        if named[: len(keys)] == keys or keys[: len(named)] == named:
            return f"--set {item}"
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in lines:
            return f"{path}:{lines[loc[:depth]]}"
    return path


def _format_errors(error: ValidationError, path: str, overrides: list[str] | None = None,
                   lines: dict[tuple[Any, ...], int] | None = None) -> str:
    """One line per problem: origin (`--set key=value`, file:line or the file), key, what is wrong."""
    problems = []
    for err in error.errors():
        loc = tuple(err["loc"])
        where = _dotted(loc) or "(top level)"
        origin = _value_origin(loc, overrides or [], lines or {}, path)
        if err["type"] == "extra_forbidden":
            problems.append(f"  - {origin}: {where}: unknown key{_suggestion(loc)} (docs/configuration.md lists every key)")
        else:
            problems.append(f"  - {origin}: {where}: {err['msg']}")
    return "\n".join(["invalid configuration:", *problems])


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (a file, or a shipped config's name; default: demo), apply overrides and validate
    it. Raises ConfigError naming the file, line or --set at fault."""
    path = find_config(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    try:
        data = yaml.safe_load(text) or {}
        lines = _key_lines(yaml.compose(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise ConfigError(f"config file {where}: not valid YAML: {what}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    _sources_relative_to(data, path.resolve().parent)
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(path), overrides, lines)) from e
