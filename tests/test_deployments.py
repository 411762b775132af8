"""The declarative deployments stay in step with the code and the demo config."""

from __future__ import annotations

from pathlib import Path

import yaml

from kdflow.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
SPEC = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())


def test_deployment_parameters_are_the_demo_config():
    demo = load_config(ROOT / "configs" / "demo.yaml")
    sweep = load_config(ROOT / "configs" / "demo-sweep.yaml")  # the sweep deployment's own config
    for deployment in SPEC["deployments"]:
        expected = sweep if deployment["name"] == "demo-sweep" else demo
        assert RunConfig.model_validate(deployment["parameters"]["cfg"]) == expected, deployment["name"]


def test_entrypoints_exist_and_only_the_main_flow_is_scheduled():
    import importlib

    for deployment in SPEC["deployments"]:
        module, _, name = deployment["entrypoint"].partition(":")
        # flows/x.py installs as kdflow.flows.x (pyproject package-dir)
        flow = getattr(importlib.import_module("kdflow." + module.removesuffix(".py").replace("/", ".")), name)
        assert callable(flow), deployment["entrypoint"]
        assert bool(deployment.get("schedules")) == deployment["name"].endswith("nightly")


def test_the_run_form_shows_the_sources():
    """The UI renders a deployment's form from its parameters and the flow's schema: both name the sources."""
    from kdflow.flows.serve import deployments

    demo = load_config(ROOT / "configs" / "demo.yaml")
    sweep = load_config(ROOT / "configs" / "demo-sweep.yaml")
    for deployment in SPEC["deployments"]:
        sources = deployment["parameters"]["cfg"]["data"]["sources"]
        assert sources, deployment["name"]  # spelled out: the form shows only the values given
        config = sweep if deployment["name"] == "demo-sweep" else demo
        assert RunConfig.model_validate({"data": {"sources": sources}}).data.sources == config.data.sources
    for deployment in deployments(demo, cron=None):
        sources = deployment.parameters["cfg"]["data"]["sources"]
        assert [RunConfig.model_validate({"data": {"sources": sources}}).data.sources] == [demo.data.sources]
    schema = RunConfig.model_json_schema()["$defs"]["DataConfig"]["properties"]["sources"]
    assert RunConfig.model_validate({"data": {"sources": schema["default"]}}) == RunConfig()
