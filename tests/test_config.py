"""The run config: every shipped YAML binds, mistakes are named, overrides apply."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
from pydantic import BaseModel, Field

from kdflow.config import ConfigError, RunConfig, load_config, shipped_configs

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_every_shipped_config_binds():
    errors = []
    for path in CONFIGS:
        try:
            load_config(path)
        except ConfigError as e:
            errors.append(str(e))
    assert CONFIGS and not errors, "\n".join(errors)


def test_shipped_configs_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"demo", "tiny", "qwen3-235b-to-30b"} <= set(shipped_configs())
    tiny = load_config(CONFIGS[0].parent / "tiny.yaml")
    assert load_config("tiny") == load_config("tiny.yaml") == tiny and tiny.name == "tiny"
    assert load_config(None).name == "demo"
    with pytest.raises(ConfigError) as e:
        load_config("tiyn")
    assert "cannot read config file tiyn: no such file" in str(e.value) and "tiny" in str(e.value)
    (tmp_path / "tiny.yaml").write_text("name: mine\n")  # a file the user names wins over a shipped name
    assert load_config("tiny.yaml").name == "mine" and load_config("tiny").name == "tiny"


def test_a_source_path_in_a_file_is_relative_to_the_file(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    config = project / "c.yaml"
    config.write_text(f"data:\n  sources:\n    - path: data/q.jsonl\n    - path: {tmp_path / 'abs.jsonl'}\n"
                      "    - path: ~/q.jsonl\n    - demo: {n_questions: 100}\n")
    monkeypatch.chdir(tmp_path)
    paths = [source.path for source in load_config("project/c.yaml").data.sources]
    assert paths == [str(project / "data" / "q.jsonl"), str(tmp_path / "abs.jsonl"), "~/q.jsonl", None]
    overridden = load_config(config, ["data.sources=[{path: q.jsonl}]"])  # the command line's folder
    assert [source.path for source in overridden.data.sources] == ["q.jsonl"]
    assert Path(load_config("smollm2-gguf").data.sources[0].path).is_file()  # its questions ship beside it


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "training.learning_rat: unknown key" in str(e.value)
    assert str(path) in str(e.value)


def test_overrides_apply_with_yaml_types(tmp_path):
    cfg = load_config(None, ["training.epochs=2.5", "training.hard_label_baseline=false", "name=x",
                             "student.lora.target_modules=[q_proj, v_proj]"])
    assert cfg.training.epochs == 2.5
    assert cfg.training.hard_label_baseline is False
    assert cfg.name == "x"
    assert cfg.student.lora.target_modules == ["q_proj", "v_proj"]
    assert RunConfig().training.seeds == [0]
    assert load_config(None, []).training.seeds == [0, 1, 2]  # the demo config compares three seeds
    assert load_config(None, ["training.seeds=[2,0,1]"]).training.seeds == [2, 0, 1]  # in the order given


@pytest.mark.parametrize("word", ["on", "off", "yes", "no", "true", "false", "'on'", "'off'", "auto"])
def test_on_off_words_survive_yaml_booleans(tmp_path, word):
    """YAML 1.1 reads a bare on/off/yes/no as a boolean; chat_template takes it back as the word."""
    expected = {"on": "on", "yes": "on", "true": "on", "off": "off", "no": "off", "false": "off"}.get(
        word.strip("'"), word.strip("'"))
    path = tmp_path / "c.yaml"
    path.write_text(f"scoring:\n  chat_template: {word}\n")
    assert load_config(path).scoring.chat_template == expected
    assert load_config(None, [f"scoring.chat_template={word}"]).scoring.chat_template == expected
    with pytest.raises(ConfigError, match="scoring.chat_template"):
        load_config(None, ["scoring.chat_template=sometimes"])


def test_gguf_file_needs_the_model_it_lies_in():
    with pytest.raises(ConfigError, match="teacher.gguf_file names a file inside teacher.model"):
        load_config(None, ["teacher.gguf_file=m.gguf"])
    with pytest.raises(ConfigError, match="student.gguf_file is read by init: pretrained only"):
        load_config(None, ["student.init=from_teacher", "student.gguf_file=m.gguf"])
    cfg = load_config(None, ["student.init=pretrained", "student.model=/m", "student.gguf_file=m.gguf"])
    assert cfg.student.gguf_file == "m.gguf"


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.alpha=2", "training.alpha"),
        ("training", "not of the form key.sub=value"),
        ("name.sub=1", "'name' is not a section"),
        ("data.splits.train=0.9", "split fractions must sum to 1"),
        ("teacher.backend=vllm", "teacher.backend=vllm needs teacher.model"),
        ("training.seeds=[]", "training.seeds: List should have at least 1 item"),
        ("training.seeds=[0, 1, 0]", "training.seeds lists [0] more than once"),
        ("training.seed=3", "training.seed was replaced by training.seeds, a list of seeds: write `seeds: [3]`"),
    ],
)
def test_bad_overrides_say_what_is_wrong(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)


def test_source_needs_exactly_one_origin():
    with pytest.raises(ConfigError, match="exactly one of path, hf_dataset or demo"):
        load_config(None, ["data.sources=[{path: a.jsonl, hf_dataset: x/y}]"])


def test_digest_changes_only_with_the_section():
    base = RunConfig()
    changed = base.model_copy(update={"name": "other"})
    assert base.digest("training") == changed.digest("training")
    assert base.digest() != changed.digest()


def test_home_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KDFLOW_HOME", str(tmp_path / "h"))
    assert RunConfig().home_dir == (tmp_path / "h").resolve()
    assert RunConfig(home=str(tmp_path / "x")).home_dir == (tmp_path / "x").resolve()


def test_override_text_that_looks_like_yaml_stays_text():
    cfg = load_config(None, ["scoring.cloze_template=Q: {question} A:", "scoring.description=a: b: c"])
    assert cfg.scoring.cloze_template == "Q: {question} A:"
    assert cfg.scoring.description == "a: b: c"


def test_errors_name_their_origin_and_the_nearest_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ntraining:\n  alpha: 0.5\n  learning_rat: 0.1\ndata:\n  splits: {train: 0.5, val: 0.1, test: 0.1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert f"{path}:4: training.learning_rat: unknown key; did you mean training.learning_rate?" in str(e.value)
    assert f"{path}:6: data.splits:" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["training.alhpa=0.7"])
    assert "--set training.alhpa=0.7: training.alhpa: unknown key; did you mean training.alpha?" in str(e.value)
    assert "demo.yaml" not in str(e.value)
    # A section-level check fails on the file's value until an override touches that section.
    with pytest.raises(ConfigError) as e:
        load_config(path, ["training.learning_rate=0.1", "data.splits.train=0.9"])
    assert "--set data.splits.train=0.9: data.splits:" in str(e.value)
    assert "did you mean" in str(e.value) and f"{path}:4:" in str(e.value)


def test_a_key_with_no_near_neighbour_gets_no_guess():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["student.zzzzzz=1"])
    assert "student.zzzzzz: unknown key" in str(e.value) and "did you mean" not in str(e.value)


def test_yaml_syntax_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntraining: {alpha: 0.5\nstudent: {}\n")
    with pytest.raises(ConfigError, match=rf"{bad}:\d+: not valid YAML"):
        load_config(bad)


def _models_reachable(model: type[BaseModel]) -> list[type[BaseModel]]:
    """`model` and every pydantic model one of its fields can hold (through unions, lists, dicts), once each."""
    found: list[type[BaseModel]] = []
    pending: list[object] = [model]
    while pending:
        kind = pending.pop()
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            if kind not in found:
                found.append(kind)
                pending += [field.annotation for field in kind.model_fields.values()]
        else:
            pending += list(get_args(kind))
    return found


def test_every_config_field_has_help_text():
    """Every setting a user can write has a description: it is the help text the JSON schema, and so the
    Prefect UI's run form, shows next to the field."""
    models = _models_reachable(RunConfig)
    assert {"RunConfig", "TeacherConfig", "LoraConfig", "SplitConfig", "GenericMapping"} <= {m.__name__ for m in models}
    missing = [f"{m.__name__}.{name}" for m in models for name, field in m.model_fields.items()
               if not (field.description or "").strip()]
    assert not missing, f"fields without a description: {missing}"
    schema = RunConfig.model_json_schema()
    sections = [schema, *schema["$defs"].values()]
    assert all("description" in prop for section in sections for prop in section.get("properties", {}).values())


def test_the_walk_finds_a_field_without_help_text():
    """The check above can fail: a nested model with an undescribed field, behind a union and a list, is found."""

    class Inner(BaseModel):
        size: int = 1

    class Outer(BaseModel):
        items: list[Inner] | None = Field(None, description="nested")

    models = _models_reachable(Outer)
    assert Inner in models
    assert [n for m in models for n, f in m.model_fields.items() if not f.description] == ["size"]


def test_a_teacher_corpus_of_another_demo_world_is_refused():
    """The demo world is fixed by (n_questions, seed): the teacher's corpus must describe the transfer set's."""
    with pytest.raises(ConfigError, match="teacher.prepare.source describes the demo world of n_questions 15000"):
        load_config("configs/demo.yaml", ['data.sources=[{"demo": {"n_questions": 1000}}]'])
    assert load_config("configs/demo.yaml", []).teacher.prepare.source.demo.corpus == "teacher"


def test_set_reaches_a_key_of_one_list_item():
    """`data.sources[0].key=value` sets that key of the first source (the form ingest's hints name), and a
    bad index or a list addressed as a section is an error naming the key, not a new config key."""
    cfg = load_config(None, ["data.sources[0].allow_unlabeled=true", "training.seeds[1]=7"])
    assert cfg.data.sources[0].allow_unlabeled is True
    assert cfg.training.seeds == [0, 7, 2]
    # A list the config file does not write is its default: tiny's training.seeds is [0].
    assert load_config("tiny", ["training.seeds[0]=7"]).training.seeds == [7]
    with pytest.raises(ConfigError, match=r"training.seeds has 1 item\(s\), numbered from 0"):
        load_config("tiny", ["training.seeds[1]=7"])
    for override, message in [
        ("data.source[0].allow_unlabeled=true", "data.source: unknown key; did you mean data.sources?"),
        ("training.alpha[0]=1", "training.alpha is not a list"),
        ("data.sources[1].allow_unlabeled=true", "data.sources has 1 item(s), numbered from 0"),
        ("data.sources.allow_unlabeled=true", "data.sources is a list: name an item"),
        ("data.sources[0].demo.sed=1", "data.sources[0].demo.sed: unknown key; did you mean data.sources[0].demo.seed?"),
        ("data.sources[0]x.y=1", "is not a key"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config(None, [override])
        assert message in str(e.value), (override, str(e.value))
