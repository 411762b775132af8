"""Where each package of kdflow sits, bottom to top; imports point only down this order.

- the shared core: every module not named below (kdflow/*.py, kdflow.config, kdflow.data, kdflow.scoring,
  kdflow.fitting, ...): it imports no stage and nothing above the stages;
- the stages, in pipeline order (STAGES): each imports the core and the stages before it, never one after;
- above them (ABOVE): sweeps, the CLI, the Prefect flows and tasks, which may import anything.

tests/test_layout.py checks every import of kdflow/, flows/ and tasks/ against this order.
"""

from __future__ import annotations

STAGES: tuple[str, ...] = ("ingest", "label", "validate", "train", "evaluate", "report")
ABOVE: tuple[str, ...] = ("sweep", "cli", "flows", "tasks")
