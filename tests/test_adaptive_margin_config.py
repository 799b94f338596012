"""head.type curricularface / magface / adaface / elasticface from the run config: fields, checks, the
trainer's head, one ablation grid, the running state in the replicated checkpoint and a skipped step."""
import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from largefr.checkpoint.save_load import CheckpointError
from largefr.checkpoint.train_state import TrainingCheckpointer
from largefr.choices import ADAPTIVE_MARGIN_TYPES, MARGIN_TYPES
from largefr.config import ConfigError, HeadConfig, load_config
from largefr.experiments.grids import load_grid
from largefr.experiments.runner import plan_runs
from largefr.heads.margins import MARGINS, build_margin
from largefr.heads.margins.elasticface import ElasticFace
from largefr.train.build import build_head
from largefr.train.distributed_env import DistributedEnv
from tests.checkpoint_helpers import TrainerStandIn

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.json")
ENV = DistributedEnv(rank=0, world_size=1, local_rank=0, launcher="env", backend="gloo", device=torch.device("cpu"))
SMALL = ["data.num_classes=50", "data.synthetic=null", "data.rec=unused"]


def test_head_config_declares_the_margin_fields_with_the_papers_defaults():
    settings = dataclasses.asdict(HeadConfig())  # the only declaration: the margins read these fields
    assert (settings["curricular_momentum"], settings["magface_lambda_g"], settings["adaface_margin"],
            settings["adaface_t_alpha"]) == (0.01, 35.0, 0.4, 0.01)
    assert ElasticFace.mean_std(HeadConfig(type="elasticface", elastic_form="cos")) == (0.35, 0.05)
    assert ElasticFace.mean_std(HeadConfig(type="elasticface", elastic_sorted=True)) == (0.5, 0.0175)
    assert ElasticFace.mean_std(HeadConfig(type="elasticface", elastic_form="cos", elastic_sorted=True)) == (0.35, 0.02)


def test_bad_adaptive_settings_are_all_reported():
    expected = ("(?s)3 problems.*head.elastic_form: must be one of.*head.magface_u_a: must be > head.magface_l_a"
                ".*head.adaface_t_alpha: must be in")
    with pytest.raises(ConfigError, match=expected):
        load_config(QUICKSTART, ["head.magface_u_a=5", "head.adaface_t_alpha=0", "head.elastic_form=sphere"])
    with pytest.raises(ValueError, match=r"head.magface_u_a: must be > head.magface_l_a \(20.0\), got 10.0"):
        HeadConfig(type="magface", magface_l_a=20.0, magface_u_a=10.0)


@pytest.mark.parametrize("key, value", [("margin", 3.5), ("combined_margins", [1.0, 3.5, 0.0]),
                                        ("elastic_margin", 4.0), ("magface_u_margin", 0.3), ("scale", 0.0)])
def test_config_and_margin_head_share_one_rule_per_margin_setting(key, value):
    """A margin value the head would refuse is refused when the config loads, naming the key (one rule)."""
    with pytest.raises(ConfigError, match=f"head.{key}: "):
        load_config(QUICKSTART, [f"head.{key}={json.dumps(value)}"])
    with pytest.raises(ValueError, match=f"head.{key}: "):  # the section the head is built from, from Python
        HeadConfig(**{key: tuple(value) if isinstance(value, list) else value})


def test_every_head_type_has_one_margin_class_built_from_the_head_section():
    """The config's head.type choices and the Margin classes of largefr/heads/margins/ are the same names;
    a margin reads the head section itself (no copy of its fields)."""
    assert sorted(MARGINS) == sorted(MARGIN_TYPES + ADAPTIVE_MARGIN_TYPES)
    for name in MARGINS:
        head = HeadConfig(type=name)
        margin = build_margin(head)
        assert margin.name == name and margin.config is head


def test_one_grid_holds_every_margin_and_each_config_builds_its_head(tmp_path):
    """The experiment tool's user grid with one setting per head.type: every config loads and builds."""
    types_ = ("arcface",) + ADAPTIVE_MARGIN_TYPES
    grid_file = tmp_path / "margins.json"
    grid_file.write_text(json.dumps({"settings": {name: [f"head.type={name}"] for name in types_}}))
    runs = plan_runs(load_grid(str(grid_file)), QUICKSTART, ["train.max_steps=10"], [0], tmp_path, world_size=2)
    assert [run.config.head.type for run in runs] == list(types_)
    for name in ADAPTIVE_MARGIN_TYPES:
        config = load_config(QUICKSTART, [f"head.type={name}", "head.adaface_h=0.5", *SMALL])
        head = build_head(config, ENV).head
        assert head.margin_head.margin.name == name and head.margin_head.adaptive is not None
        assert head.margin_head.margin.config.adaface_h == 0.5


NO_CLUSTER = ["cluster.cg_margin=false", "cluster.contrastive_weight=0", "cluster.aligning_weight=0"]


def _checkpointer(parts, config, folder):
    return TrainingCheckpointer(str(folder), head=parts.head, weight_optimizer=parts.weight_optimizer,
                                tau_optimizer=parts.tau_optimizer, momentum_encoder=None, keep_last=1,
                                config=config.to_dict(), device=torch.device("cpu"))


def _step(head, seed):
    gen = torch.Generator().manual_seed(seed)
    embeddings = 30 * torch.randn(8, head.margin_head.weight.shape[1], generator=gen)
    labels = torch.randint(0, 50, (8,), generator=gen)
    return head(embeddings, labels)[0].item()


def _running_state(head):
    state = copy.deepcopy(head.margin_head.adaptive.state_dict())
    if "_extra_state" in state:
        state["_extra_state"] = state["_extra_state"]["generator"]
    return state


@pytest.mark.parametrize("name", ["curricularface", "adaface", "elasticface"])
def test_running_state_travels_in_the_replicated_checkpoint(name, tmp_path):
    """A resumed head (state from the replicated part: no rank, no world size in it) takes the same next step."""
    config = load_config(QUICKSTART, [f"head.type={name}", "head.elastic_sorted=true", *NO_CLUSTER, *SMALL])
    saved_by, resumed = build_head(config, ENV), build_head(config, ENV)
    _step(saved_by.head, 0)
    replicated = copy.deepcopy(_checkpointer(saved_by, config, tmp_path).replicated(TrainerStandIn()))
    expected = _step(saved_by.head, 1)
    _step(resumed.head, 5)  # some other running state, replaced by the restore
    _checkpointer(resumed, config, tmp_path).restore_replicated(str(tmp_path), replicated, TrainerStandIn())
    assert _step(resumed.head, 1) == expected
    assert all(torch.equal(a, b) for a, b in zip(_running_state(resumed.head).values(),
                                                 _running_state(saved_by.head).values()))


@pytest.mark.parametrize("name", ADAPTIVE_MARGIN_TYPES)
def test_a_skipped_step_leaves_the_running_state_as_it_was(name):
    config = load_config(QUICKSTART, [f"head.type={name}", *NO_CLUSTER, *SMALL])
    head = build_head(config, ENV).head
    _step(head, 0)
    before = _running_state(head)
    _step(head, 1)
    changed = any(not torch.equal(a, b) for a, b in zip(before.values(), _running_state(head).values()))
    assert changed == (name != "magface")  # MagFace has no running state
    head.undo_last_update()  # the trainer's skip of a non-finite step
    assert all(torch.equal(a, b) for a, b in zip(before.values(), _running_state(head).values()))


def test_resume_without_the_margin_state_is_refused(tmp_path):
    config = load_config(QUICKSTART, ["head.type=adaface", *NO_CLUSTER, *SMALL])
    parts = build_head(config, ENV)
    checkpointer = _checkpointer(parts, config, tmp_path)
    replicated = checkpointer.replicated(TrainerStandIn())
    replicated.pop("margin_state")
    with pytest.raises(CheckpointError, match="lacks the running margin state"):
        checkpointer.restore_replicated(str(tmp_path), replicated, TrainerStandIn())
