"""What every config section is built on: ConfigError (a problem phrased so the user knows what to
change), the Strict base model (unknown keys are errors, assignments are validated) and OnOffAuto, a
setting whose words include on and off.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict


class ConfigError(ValueError):
    """A configuration problem, phrased so the user knows what to change."""


def _switch_word(value: Any) -> Any:
    """YAML 1.1 reads a bare on/off/yes/no as a boolean: take it back as the word "on" or "off"."""
    return ("on" if value else "off") if isinstance(value, bool) else value


# A setting whose values are words including "on" and "off", safe to write unquoted in YAML and --set.
OnOffAuto = Annotated[Literal["auto", "on", "off"], BeforeValidator(_switch_word)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
