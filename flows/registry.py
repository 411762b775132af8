"""The pipeline's flows in one table: the CLI (`kdflow run`, `sweep` and the stage commands), `kdflow serve`
and deployments/prefect.yaml all read or are checked against `FLOWS` (tests/test_deployments.py).

Entries hold the flow function's import path as a string, so the CLI can read the table without importing
Prefect; `load_flow` imports it when a flow runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FlowEntry:
    """One flow.

    name: the flow's key, and its deployments' name suffix unless `scheduled` (then "nightly");
    target: "module:function" of the @flow; description: the deployment's description;
    scheduled: deployed on a schedule (the nightly main flow), else manual-only;
    command: the `kdflow` command that runs it (None: deployments only; `kdflow ingest` ingests without Prefect);
    gpu: its deployments carry the `gpu` tag (its tasks use a GPU when the config has one).
    """

    name: str
    target: str
    description: str
    scheduled: bool
    command: str | None
    gpu: bool

    @property
    def deployment_suffix(self) -> str:
        return "nightly" if self.scheduled else self.name

    @property
    def tags(self) -> list[str]:
        return ["kdflow", "nightly" if self.scheduled else "manual", *(["gpu"] if self.gpu else [])]

    @property
    def entrypoint(self) -> str:
        """The deployment entrypoint, relative to the repository root ("flows/distill.py:distill")."""
        module, _, function = self.target.partition(":")
        return f"{module.removeprefix('kdflow.').replace('.', '/')}.py:{function}"


FLOWS: tuple[FlowEntry, ...] = (
    FlowEntry("distill", "kdflow.flows.distill:distill", "The whole pipeline, every night.",
              scheduled=True, command="run", gpu=False),
    FlowEntry("ingest", "kdflow.flows.stage_flows:ingest_flow", "Ingest the configured sources (manual).",
              scheduled=False, command=None, gpu=False),
    FlowEntry("label", "kdflow.flows.stage_flows:label_flow",
              "Prepare the teacher if asked, then label what it has not labeled yet (manual).",
              scheduled=False, command="label", gpu=True),
    FlowEntry("validate", "kdflow.flows.stage_flows:validate_flow", "The data-quality gate on the soft labels (manual).",
              scheduled=False, command="validate", gpu=False),
    FlowEntry("train", "kdflow.flows.stage_flows:train_flow",
              "Distil the students from validated labels (manual; resumes from checkpoints).",
              scheduled=False, command="train", gpu=True),
    FlowEntry("evaluate", "kdflow.flows.stage_flows:evaluate_flow",
              "Evaluate teacher and students and rebuild the report (manual).",
              scheduled=False, command="evaluate", gpu=True),
    FlowEntry("sweep", "kdflow.flows.sweep:sweep",
              "Train and compare the config's grid of students (`sweep:`) in one report (manual).",
              scheduled=False, command="sweep", gpu=True),
)


def flow_entry(name: str) -> FlowEntry:
    """The entry named `name`; raises KeyError naming the known flows."""
    for entry in FLOWS:
        if entry.name == name:
            return entry
    raise KeyError(f"no flow {name!r}: one of {', '.join(e.name for e in FLOWS)}")


def load_flow(entry: FlowEntry) -> Any:
    """The entry's @flow function (imports its module, and with it Prefect)."""
    module, _, function = entry.target.partition(":")
    return getattr(importlib.import_module(module), function)
