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


def test_deployments_file_is_the_flow_table():
    """deployments/prefect.yaml has one deployment per flow of the table, with its entrypoint, description,
    schedule and tags, and no other."""
    from kdflow.flows.registry import FLOWS, load_flow

    by_name = {d["name"]: d for d in SPEC["deployments"]}
    assert sorted(by_name) == sorted(f"demo-{entry.deployment_suffix}" for entry in FLOWS)
    for entry in FLOWS:
        deployment = by_name[f"demo-{entry.deployment_suffix}"]
        assert deployment["entrypoint"] == entry.entrypoint, entry.name
        assert deployment["description"] == entry.description, entry.name
        assert bool(deployment.get("schedules")) == entry.scheduled, entry.name
        assert deployment["tags"] == entry.tags, entry.name
        assert load_flow(entry).name == entry.name.replace("_", "-"), entry.name


def test_kdflow_serve_serves_exactly_the_flow_table():
    from kdflow.flows.registry import FLOWS
    from kdflow.flows.serve import deployments

    served = {d.name: d for d in deployments(load_config(ROOT / "configs" / "demo.yaml"))}
    assert sorted(served) == sorted(f"demo-{entry.deployment_suffix}" for entry in FLOWS)
    for entry in FLOWS:
        deployment = served[f"demo-{entry.deployment_suffix}"]
        assert deployment.flow_name == entry.name and deployment.tags == entry.tags, entry.name
        assert deployment.description == entry.description, entry.name
        assert bool(deployment.schedules) == entry.scheduled, entry.name


def test_the_cli_commands_run_exactly_the_flow_table():
    """Each command that runs a flow names the table's flow whose `command` it is, and no other command does."""
    import ast

    from kdflow.flows.registry import FLOWS

    tree = ast.parse((ROOT / "kdflow" / "cli" / "commands.py").read_text())
    runs = {}
    for function in (node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)):
        for call in (n for n in ast.walk(function) if isinstance(n, ast.Call)):
            if isinstance(call.func, ast.Name) and call.func.id == "run_flow":
                runs[function.name] = call.args[0].value
    assert runs == {entry.command: entry.name for entry in FLOWS if entry.command}


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
