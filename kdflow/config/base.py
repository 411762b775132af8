"""What every config section is built on: ConfigError (a problem phrased so the user knows what to
change), the Strict base model (unknown keys are errors, assignments are validated), OnOffAuto, a
setting whose words include on and off, and section_model, the section a field holds.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict


class ConfigError(ValueError):
    """A configuration problem, phrased so the user knows what to change."""


def switch_word(value: Any) -> Any:
    """YAML 1.1 reads a bare on/off/yes/no as a boolean: take it back as the word "on" or "off"."""
    return ("on" if value else "off") if isinstance(value, bool) else value


# A setting whose values are words including "on" and "off", safe to write unquoted in YAML and --set.
OnOffAuto = Annotated[Literal["auto", "on", "off"], BeforeValidator(switch_word)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The config section (pydantic model) a field's annotation holds, through Optional, unions and lists
    (`list[SourceConfig] | None` -> SourceConfig); None for a plain setting."""
    candidates = [annotation, *get_args(annotation)]
    candidates += [arg for c in candidates for arg in get_args(c)]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
