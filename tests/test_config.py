"""Strict config loading: shipped configs, documentation, errors, overrides, YAML, round trips."""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from largefr.config import (Config, ConfigError, HeadConfig, config_classes, config_to_json,
                            field_docs, load_config)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(p for p in CONFIG_DIR.iterdir() if p.suffix in (".json", ".yaml", ".yml"))


def minimal(**sections) -> dict:
    """The smallest valid config as plain data, with sections replaced or added."""
    data = {"data": {"rec": "/data/ms1m", "num_classes": 100, "num_images": 5000},
            "output": "/tmp/run"}
    data.update(sections)
    return data


def write_json(tmp_path: Path, data: dict, name: str = "run.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------------------- shipped configs


def test_configs_folder_is_not_empty():
    assert {p.name for p in SHIPPED} >= {"ms1m_r100.json", "ms1mv3_r100.json", "quickstart.json"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_config_parses_and_round_trips(path):
    config = load_config(path, world_size=8)
    assert Config.from_dict(config.to_dict()) == config
    assert Config.from_dict(json.loads(config_to_json(config))) == config


def test_ms1m_r100_is_the_paper_setting():
    c = load_config(CONFIG_DIR / "ms1m_r100.json", world_size=8)
    assert (c.data.num_classes, c.data.num_images) == (85742, 5822653)
    assert (c.model.network, c.model.embedding_size) == ("r100", 512)
    assert (c.head.type, c.head.scale, c.head.margin) == ("arcface", 64.0, 0.5)
    assert (c.optim.name, c.optim.lr) == ("adam", 0.001)
    assert (c.schedule.type, c.schedule.milestones, c.schedule.gamma) == ("step", [20, 40, 60], 0.1)
    assert c.schedule.epochs == 80 and c.global_batch_size(8) == 512
    cl = c.cluster
    assert (cl.encoder_momentum, cl.queue_size, cl.bank_momentum) == (0.999, 8192, 0.9)
    assert (cl.num_sampled_centers, cl.alpha) == (2048, 10.0)
    assert (cl.contrastive_weight, cl.aligning_weight) == (1.0, 0.5)
    assert c.data.val_targets == ["lfw", "cfp_fp", "agedb_30"]


def test_paper_config_is_the_tuned_setting_with_eq6_taken_literally():
    """configs/ms1m_r100_paper.yaml differs from the tuned ms1m_r100.json only in Eq. 6's temperature."""
    tuned = load_config(CONFIG_DIR / "ms1m_r100.json", world_size=8).to_dict()
    paper = load_config(CONFIG_DIR / "ms1m_r100_paper.yaml", world_size=8).to_dict()
    differences = {(section, key): (values[key], paper[section][key])
                   for section, values in tuned.items() if isinstance(values, dict)
                   for key in values if values[key] != paper[section][key]}
    assert differences == {("cluster", "temperature_mode"): ("pcl", "raw")}
    assert paper["output"] != tuned["output"]


def test_webface42m_uses_partial_fc():
    configs = [load_config(p) for p in SHIPPED]
    large = [c for c in configs if c.data.num_classes == 2059906]
    assert large and all(c.head.sample_rate == pytest.approx(0.2) for c in large)


# ---------------------------------------------------------------------------- documentation


@dataclass(kw_only=True)
class _PartlyDocumented:
    documented: int = 1
    """This one has a docstring."""
    undocumented: int = 2


def test_field_docs_finds_a_missing_docstring():
    assert list(field_docs(_PartlyDocumented)) == ["documented"]


@pytest.mark.parametrize("cls", config_classes(), ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(cls):
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name, "").strip()]
    assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("section, key, suggestion", [
    ("head", "marign", "head.margin"),        # typo
    ("train", "lr", "optim.lr"),              # right name, wrong section
    ("data", "numclasses", "data.num_classes"),
])
def test_unknown_key_names_file_path_and_closest_key(tmp_path, section, key, suggestion):
    data = minimal()
    data.setdefault(section, {})[key] = 1
    path = write_json(tmp_path, data, "bad.json")
    match = rf"bad\.json: {section}\.{key}: unknown key \(did you mean '{suggestion}'\?\)"
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_unknown_top_level_key_suggests_a_section_key(tmp_path):
    path = write_json(tmp_path, minimal(margin=0.4), "top.json")
    with pytest.raises(ConfigError, match=r"top\.json: margin: unknown key .*'head\.margin'"):
        load_config(path)


def test_all_problems_are_reported_at_once(tmp_path):
    data = minimal(head={"sample_rate": 1.5, "scale": "64"},
                   optim={"lr": -0.1}, train={"batch_size": 0, "zero_stage": 3},
                   cluster={"queue_size": 0}, schedule={"milestones": [20, 10], "epochs": 30})
    data["data"]["num_classes"] = True       # bool is not int
    data["outptu"] = "x"
    path = write_json(tmp_path, data, "many.json")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    keys = [key for key, _ in caught.value.issues]
    assert keys == ["outptu", "data.num_classes", "head.scale", "head.sample_rate",
                    "cluster.queue_size", "optim.lr", "schedule.milestones", "train.batch_size",
                    "train.zero_stage"]
    lines = str(caught.value).splitlines()
    assert lines[0] == f"9 problems in configuration {path}:"
    assert all(line.startswith(f"{path}: ") for line in lines[1:])


@pytest.mark.parametrize("section, values, match", [
    ("optim", {"lr": 0}, r"optim\.lr: must be > 0"),
    ("head", {"sample_rate": 0.0}, r"head\.sample_rate: must be in \(0, 1\]"),
    ("head", {"sample_rate": 1.01}, r"head\.sample_rate: must be in \(0, 1\]"),
    ("train", {"batch_size": -4}, r"train\.batch_size: must be >= 1"),
    ("cluster", {"queue_size": 0}, r"cluster\.queue_size: must be >= 1"),
    ("schedule", {"milestones": [20, 20]}, r"schedule\.milestones: must be strictly increasing"),
    ("schedule", {"milestones": [10, 30], "epochs": 20}, r"\[30\.0\] would never apply"),
    ("train", {"precision": "fp8"}, r"train\.precision: must be one of 'fp32', 'bf16', 'fp16'"),
    ("train", {"zero_stage": 4}, r"train\.zero_stage: must be one of 0, 1, 2, got 4"),
    ("train", {"batch_size": 32.0}, r"train\.batch_size: must be an integer, got 32\.0"),
    ("eval", {"flip": 1}, r"eval\.flip: must be a boolean, got 1 \(integer\)"),
    ("data", {"num_images": 50}, r"data\.num_images: must be >= data\.num_classes \(100\)"),
    ("model", {"network": "r101"}, r"model\.network: must be one of .*did you mean 'r100'"),
])
def test_impossible_values_are_refused(section, values, match):
    data = minimal()
    data.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=match):
        Config.from_dict(data)


def test_int_is_accepted_for_float():
    config = Config.from_dict(minimal(head={"scale": 30}))
    assert config.head.scale == 30.0 and isinstance(config.head.scale, float)


def test_zero3_is_refused_with_a_clear_message():
    with pytest.raises(ConfigError, match=r"train\.zero_stage: ZeRO-3 is not supported yet"):
        Config.from_dict(minimal(train={"zero_stage": 3}))


def test_num_classes_below_world_size():
    data = minimal()
    data["data"].update(num_classes=3, num_images=5000)
    Config.from_dict(data, world_size=3)
    with pytest.raises(ConfigError, match=r"data\.num_classes: 3 is smaller than the world size"):
        Config.from_dict(data, world_size=4)


def test_queue_must_hold_a_global_batch():
    data = minimal(train={"batch_size": 64}, cluster={"queue_size": 256})
    Config.from_dict(data, world_size=4)
    with pytest.raises(ConfigError, match=r"cluster\.queue_size: 256 cannot hold one global"):
        Config.from_dict(data, world_size=8)
    data["cluster"].update(cg_margin=False, contrastive_weight=0.0, aligning_weight=0.0)
    assert not Config.from_dict(data, world_size=8).cluster.enabled


@pytest.mark.parametrize("deepspeed, instead", [
    ({"train_batch_size": 512}, "train.batch_size"),
    ({"train_micro_batch_size_per_gpu": 64}, "train.batch_size"),
    ({"gradient_accumulation_steps": 2}, "train.gradient_accumulation_steps"),
    ({"optimizer": {"type": "Adam"}}, "optim.name"),
    ({"scheduler": {"type": "WarmupLR"}}, "schedule.type"),
    ({"gradient_clipping": 1.0}, "optim.gradient_clipping"),
    ({"bf16": {"enabled": True}}, "train.precision"),
    ({"zero_optimization": {"stage": 2}}, "train.zero_stage"),
])
def test_deepspeed_keys_owned_by_the_trainer_are_refused(deepspeed, instead):
    key = next(iter(deepspeed))
    with pytest.raises(ConfigError, match=rf"deepspeed\.{key}.*set {instead}"):
        Config.from_dict(minimal(deepspeed=deepspeed))


def test_other_deepspeed_keys_pass_through():
    extra = {"zero_optimization": {"overlap_comm": True}, "fp16": {"loss_scale_window": 500},
             "wall_clock_breakdown": False}
    assert Config.from_dict(minimal(deepspeed=extra)).deepspeed == extra


def test_rec_is_required_unless_data_is_synthetic():
    data = minimal()
    del data["data"]["rec"]
    with pytest.raises(ConfigError, match=r"data\.rec: required: the folder holding train\.rec"):
        Config.from_dict(data)
    data["data"]["loader"] = "synthetic"
    assert Config.from_dict(data).data.rec is None


def test_synthetic_data_set_must_agree_with_data_sizes():
    from largefr.data.prepare import training_folder

    data = minimal()
    del data["data"]["rec"]
    data["data"]["synthetic"] = {"identities": 50, "images_per_identity": 10, "cache_dir": "c"}
    with pytest.raises(ConfigError, match=r"data\.num_classes: must equal data\.synthetic\.ide"):
        Config.from_dict(data)
    data["data"].update(num_classes=50, num_images=500)
    assert training_folder(Config.from_dict(data).data) == "c"


def test_python_construction_is_validated_too():
    with pytest.raises(ConfigError, match=r"<python>: head\.init_std: must be > 0"):
        HeadConfig(init_std=0.0)
    with pytest.raises(ConfigError, match=r"head\.type: must be one of .*got 'arc'"):  # choices too
        HeadConfig(type="arc")


def test_file_problems_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.json: <file>: no such file"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text('{"data": {')
    with pytest.raises(ConfigError, match=r"broken\.json: <file>: cannot parse"):
        load_config(tmp_path / "broken.json")
    (tmp_path / "twice.json").write_text('{"output": "a", "output": "b"}')
    with pytest.raises(ConfigError, match=r"duplicate key 'output'"):
        load_config(tmp_path / "twice.json")
    (tmp_path / "run.toml").write_text("")
    with pytest.raises(ConfigError, match=r"run\.toml: <file>: unknown extension"):
        load_config(tmp_path / "run.toml")


# ---------------------------------------------------------------------------- overrides


def test_overrides_set_values_of_every_type(tmp_path):
    path = write_json(tmp_path, minimal())
    config = load_config(path, [
        "head.margin=0.4", "data.rec=/data/ms1m", "data.val_targets=[lfw,cfp_fp]",
        "optim.lr=1e-3", "train.max_steps=10", "checkpoint.resume=auto", "eval.flip=false",
        "deepspeed.zero_optimization.reduce_bucket_size=5e8", "output=/tmp/other",
        "data.synthetic.cache_dir=/tmp/cache"])
    assert config.head.margin == 0.4 and config.data.rec == "/data/ms1m"
    assert config.data.val_targets == ["lfw", "cfp_fp"]
    assert config.optim.lr == pytest.approx(1e-3) and config.train.max_steps == 10
    assert config.checkpoint.resume == "auto" and config.eval.flip is False
    assert config.deepspeed == {"zero_optimization": {"reduce_bucket_size": 5e8}}
    assert config.output == "/tmp/other" and config.data.synthetic.cache_dir == "/tmp/cache"


def test_later_override_wins_and_file_is_untouched(tmp_path):
    path = write_json(tmp_path, minimal())
    before = path.read_text()
    assert load_config(path, ["head.scale=30", "head.scale=32"]).head.scale == 32.0
    assert path.read_text() == before


@pytest.mark.parametrize("override, match", [
    ("head.sample_rate=1.5", r"--set head\.sample_rate=1\.5: head\.sample_rate: must be in"),
    ("head.margn=0.4", r"--set head\.margn=0\.4: head\.margn: unknown key .*'head\.margin'"),
    ("train.batch_size=abc", r"train\.batch_size: must be an integer, got 'abc'"),
    ("head.margin", r"head\.margin: an override must be KEY=VALUE"),
    ("output.dir=x", r"output\.dir: cannot set it: 'output' holds"),
    ("data.val_targets=[lfw", r"data\.val_targets: cannot parse the value"),
    ("train.zero_stage=3", r"--set train\.zero_stage=3: train\.zero_stage: ZeRO-3 is not"),
])
def test_overrides_are_validated(tmp_path, override, match):
    path = write_json(tmp_path, minimal())
    with pytest.raises(ConfigError, match=match):
        load_config(path, [override])


def test_override_problems_and_file_problems_together(tmp_path):
    path = write_json(tmp_path, minimal(optim={"lr": -1}), "base.json")
    with pytest.raises(ConfigError) as caught:
        load_config(path, ["head.scale=-1"])
    assert caught.value.lines == [
        "--set head.scale=-1: head.scale: must be > 0, got -1.0",
        f"{path}: optim.lr: must be > 0, got -1.0"]


# ---------------------------------------------------------------------------- YAML, round trip


def test_yaml_gives_the_same_config_as_json(tmp_path):
    source = CONFIG_DIR / "ms1m_r100.json"
    path = tmp_path / "ms1m_r100.yaml"
    path.write_text(yaml.safe_dump(json.loads(source.read_text())))
    assert load_config(path) == load_config(source)


def test_yaml_reads_exponent_floats_and_refuses_duplicates(tmp_path):
    path = tmp_path / "run.yml"
    path.write_text("data: {rec: /d, num_classes: 10, num_images: 1000}\n"
                    "optim: {name: adam, lr: 1e-3, weight_decay: 5E-4}\noutput: out\n")
    config = load_config(path)
    assert config.optim.lr == pytest.approx(1e-3)
    assert config.optim.weight_decay == pytest.approx(5e-4)
    path.write_text(path.read_text() + "output: again\n")
    with pytest.raises(ConfigError, match=r"run\.yml: <file>: cannot parse.*duplicate key 'outp"):
        load_config(path)


def test_round_trip_keeps_every_non_default_value():
    data = minimal(head={"type": "combined", "combined_margins": [1.0, 0.3, 0.2]},
                   cluster={"lambda_range": [0.2, 0.8], "temperature_mode": "raw"},
                   schedule={"type": "step", "unit": "step", "milestones": [100, 200]},
                   checkpoint={"resume": "/ckpt/step_100"}, deepspeed={"steps_per_print": 5})
    data["data"]["synthetic"] = {"identities": 10, "seed": 3}
    config = Config.from_dict(data)
    assert Config.from_dict(config.to_dict()) == config
    assert config.to_dict()["head"]["combined_margins"] == [1.0, 0.3, 0.2]
    assert config.checkpoint_dir == Path("/tmp/run/checkpoints")


# ---------------------------------------------------------------------------- choices declared once

_STILL_DECLARED_TWICE: dict[str, str] = {}
"""Files that still repeat a choice list (none)."""


def test_choice_lists_are_declared_once_in_largefr_choices():
    """No module of the package writes out a choice list of largefr/choices.py again (as a tuple, list or set)."""
    import ast

    import largefr.choices as choices

    declared = {frozenset(value): name for name, value in vars(choices).items()
                if isinstance(value, (tuple, dict)) and len(value) >= 2 and all(isinstance(v, str) for v in value)}
    package = Path(__file__).resolve().parent.parent / "largefr"
    repeated = []
    for path in sorted(package.rglob("*.py")):
        relative = f"largefr/{path.relative_to(package).as_posix()}"
        for node in ast.walk(ast.parse(path.read_text())):
            values = [e.value for e in getattr(node, "elts", []) if isinstance(e, ast.Constant)]
            if (isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(values) == len(node.elts) >= 2
                    and all(isinstance(v, str) for v in values) and frozenset(values) in declared
                    and path.name != "choices.py"):
                name = declared[frozenset(values)]
                if _STILL_DECLARED_TWICE.get(relative) != name:
                    repeated.append(f"{relative}:{node.lineno}: {values} is largefr.choices.{name}")
    assert repeated == []


def test_a_per_rank_batch_of_one_is_refused_for_a_batchnorm_backbone():
    from largefr.config_validation import BATCHNORM_MIN_BATCH

    for network in ("mbf", "r18", "vit_t"):
        with pytest.raises(ConfigError, match=rf"train\.batch_size: 1 image per rank cannot train "
                                              rf"model\.network={network}: its BatchNorm .* train\.batch_size >= "
                                              rf"{BATCHNORM_MIN_BATCH}"):
            Config.from_dict(minimal(train={"batch_size": 1}, model={"network": network}))
    assert Config.from_dict(minimal(train={"batch_size": BATCHNORM_MIN_BATCH})).train.batch_size == 2
