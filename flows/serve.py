"""Serving the flows: every deployment of the flow table (kdflow.flows.registry) with its schedule, from one
long-running process (`kdflow serve`)."""

from __future__ import annotations

from kdflow.config import RunConfig
from kdflow.flows.registry import FLOWS, load_flow

NIGHTLY_CRON = "0 2 * * *"


def deployments(cfg: RunConfig, *, cron: str | None = NIGHTLY_CRON) -> list:
    """One deployment per flow of the table, all with this config: the scheduled ones on `cron`, the others
    (each stage, the sweep with the config's `sweep:` section) manual-only."""
    params = {"cfg": cfg.model_dump(mode="json", exclude_defaults=True)}
    # The sources always: the UI's run form shows only given values ("No items in this list" otherwise).
    params["cfg"].setdefault("data", {})["sources"] = cfg.model_dump(mode="json", exclude_none=True)["data"]["sources"]
    return [load_flow(entry).to_deployment(name=f"{cfg.name}-{entry.deployment_suffix}", description=entry.description,
                                           cron=cron if entry.scheduled else None, parameters=params, tags=entry.tags)
            for entry in FLOWS]


def serve(cfg: RunConfig, *, cron: str | None = NIGHTLY_CRON) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(cfg, cron=cron))
