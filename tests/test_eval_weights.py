"""Loading a backbone for evaluation: state_dict files, checkpoint directories, inferred network, clear errors."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from largefr.checkpoint.backbone import read_weights_file
from largefr.eval.weights import WeightsError, build_backbone, infer_network, load_backbone
from largefr.models import get_model
from tests.eval_fixtures import EMBEDDING_SIZE, NETWORK, quickstart_checkpoint


def _same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(loaded[key].cpu(), value.to(loaded[key].dtype), rtol=0, atol=0)


@pytest.mark.parametrize("network,size", [("r18", 64), ("r34", 32), ("mbf", 128), ("mbf_large", 256), ("vit_t", 512),
                                          ("vit_s", 64), ("vit_b", 512), ("vit_l", 128)])
def test_network_and_embedding_size_inferred(network, size):
    with torch.device("meta"):
        state = get_model(network, embedding_size=size).state_dict()
    assert infer_network(state) == network


def test_plain_state_dict_loads_with_inferred_network(tmp_path):
    torch.manual_seed(3)
    state = get_model("r18", embedding_size=64).state_dict()
    path = str(tmp_path / "r18.pt")
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # as DataParallel/DeepSpeed name them
    loaded = load_backbone(weights=path)
    assert (loaded.network, loaded.embedding_size, loaded.source) == ("r18", 64, path)
    assert not loaded.model.training
    _same_weights(loaded.model, state)


def test_checkpoint_directory_and_root_load_the_engine_weights(tmp_path):
    from largefr.checkpoint.backbone import export_backbone

    checkpoint = quickstart_checkpoint()
    expected = export_backbone(checkpoint.step_dir, str(tmp_path / "exported.pt"))
    for path in (checkpoint.step_dir, checkpoint.root):  # a root resolves to its latest complete step
        loaded = load_backbone(checkpoint=path)
        assert (loaded.network, loaded.embedding_size) == (NETWORK, EMBEDDING_SIZE)
        assert loaded.source == checkpoint.step_dir
        _same_weights(loaded.model, expected)
    engine_file = os.path.join(checkpoint.step_dir, "engine", "mp_rank_00_model_states.pt")
    _same_weights(load_backbone(weights=engine_file).model, expected)  # DeepSpeed's own file, key 'module'


def test_wrong_network_names_mismatching_keys(tmp_path):
    path = str(tmp_path / "r18.pt")
    torch.save(get_model("r18", embedding_size=64).state_dict(), path)
    with pytest.raises(WeightsError, match=r"r18.pt: weights do not fit network 'r34'.*missing keys \(layer1\.2\..*"
                                           r"they fit --network r18"):
        load_backbone(weights=path, network="r34")
    with pytest.raises(WeightsError, match=r"keys of another shape \(fc.weight: file \[64, 25088\] vs network "
                                           r"\[32, 25088\]"):
        load_backbone(weights=path, embedding_size=32, network="r18")


def test_unknown_weights_refused_naming_the_networks(tmp_path):
    state = get_model("r18", embedding_size=8).state_dict()
    state["extra.weight"] = torch.zeros(8)
    with pytest.raises(WeightsError, match="fit none of the networks r18, r34.*embedding size 8"):
        build_backbone(state, source="x.pt")


def test_bad_files_rejected(tmp_path):
    with pytest.raises(WeightsError, match="missing.pt: no such file"):
        read_weights_file(str(tmp_path / "missing.pt"))
    with pytest.raises(WeightsError, match="is a directory; pass a checkpoint directory with --checkpoint"):
        read_weights_file(str(tmp_path))
    listing = str(tmp_path / "list.pt")
    torch.save([torch.zeros(2)], listing)
    with pytest.raises(WeightsError, match="expected a state_dict"):
        read_weights_file(listing)
    hostile = str(tmp_path / "hostile.pt")
    with open(hostile, "wb") as handle:
        pickle.dump({"weight": os.system}, handle, protocol=2)  # would name a callable on load
    with pytest.raises(WeightsError, match="refused to load"):
        read_weights_file(hostile)
    with pytest.raises(WeightsError, match=r"holds no checkpoint \(found: hostile.pt, list.pt\); name a run folder"):
        load_backbone(checkpoint=str(tmp_path))
    with pytest.raises(WeightsError, match="exactly one of --weights FILE or --checkpoint DIR"):
        load_backbone()


@pytest.mark.parametrize("network,image_size", [("mbf", 32), ("r18", 64), ("vit_t", 32)])
def test_weights_of_a_small_input_side_are_recognised(network, image_size):
    """CPU runs (the quickstart trains at 32 px) give weights whose embedding layer fits only that side."""
    from largefr.eval.weights import infer_network_and_size
    from largefr.models import get_model

    state = get_model(network, embedding_size=64, image_size=image_size).state_dict()
    assert infer_network_and_size(state) == (network, image_size)
    loaded = build_backbone(state, source="test", network=network)
    assert loaded.model.image_size == image_size
    out = loaded.model(torch.zeros(2, 3, image_size, image_size))
    assert out.shape == (2, 64)


def test_vit_weights_load_for_embedding_and_a_wrong_size_is_named(tmp_path):
    """An arcface_torch ViT backbone.pth (same names) loads through --weights; vit_s weights refuse vit_t."""
    torch.manual_seed(1)
    state = get_model("vit_t", embedding_size=32, image_size=32).state_dict()
    path = str(tmp_path / "backbone.pth")
    torch.save(state, path)
    loaded = load_backbone(weights=path)
    assert (loaded.network, loaded.embedding_size, loaded.model.image_size) == ("vit_t", 32, 32)
    _same_weights(loaded.model, state)
    with pytest.raises(WeightsError, match=r"do not fit network 'vit_s'.*keys of another shape \(pos_embed"):
        load_backbone(weights=path, network="vit_s")
