"""model.init_from (errors named by file and key, on every rank) and head.init='class_mean' (W rows,
bank rows and phi against a dense float64 reference, world sizes 1-3 with uneven shards)."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from largefr.config import ClusterConfig, HeadConfig
from largefr.heads.joint import ClusterGuidedHead
from largefr.heads.sharded_head import ShardedMarginHead
from largefr.models import get_model
from largefr.train.warm_start import InitFromError, class_mean_warm_start, load_init_weights
from tests.distributed_helpers import run_distributed

SIDE = 32


def _mbf(embedding_size: int = 8, network: str = "mbf") -> torch.nn.Module:
    torch.manual_seed(0)
    return get_model(network, embedding_size=embedding_size, image_size=SIDE)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("weights") / "backbone.pth"
    model = _mbf()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)  # a DataParallel-style prefix
    return str(path)


def test_init_from_loads_every_tensor(saved):
    model = _mbf()
    assert load_init_weights(model, saved, network="mbf", embedding_size=8) == saved
    state = torch.load(saved, weights_only=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[f"module.{key}"], rtol=0, atol=0)


def _unchanged_after_error(model: torch.nn.Module, path: str, match: str, **fit) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InitFromError, match=match):
        load_init_weights(model, path, **fit)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded in part


def test_init_from_an_arcface_torch_vit_backbone(tmp_path):
    """A ViT backbone.pth (arcface_torch's names) loads strictly and embeds as the saved model; another size
    is refused naming the network that fits."""
    from largefr.models import get_model

    torch.manual_seed(2)
    source = get_model("vit_t", embedding_size=8, image_size=32).eval()  # a side weight inference tries
    path = str(tmp_path / "backbone.pth")
    torch.save(source.state_dict(), path)
    target = get_model("vit_t", embedding_size=8, image_size=32)
    assert load_init_weights(target, path, network="vit_t", embedding_size=8) == path
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target.eval()(images), source(images))
    with pytest.raises(InitFromError, match=r"do not fit model.network=vit_s.*set model.network=vit_t"):
        load_init_weights(get_model("vit_s", embedding_size=8, image_size=32), path, network="vit_s",
                          embedding_size=8)


def test_missing_file_is_named(tmp_path):
    path = str(tmp_path / "nope.pth")
    _unchanged_after_error(_mbf(), path, rf"model.init_from={path}: no such file or folder; give an insightface "
                                         r"backbone.pth", network="mbf", embedding_size=8)


def test_wrong_network_names_the_keys_and_the_network_that_fits(saved):
    model = _mbf(network="r18")
    _unchanged_after_error(model, saved, rf"model.init_from={saved}: the weights do not fit model.network=r18 "
                                         r"with model.embedding_size=8: \d+ missing keys \(conv1.weight.*set "
                                         r"model.network=mbf", network="r18", embedding_size=8)


def test_wrong_embedding_size_names_the_key_and_both_shapes(saved):
    _unchanged_after_error(_mbf(16), saved, r"model.embedding_size=16: 5 keys of another shape \(features.layers.2.weight: "
                                            r"file \[8, 512\] vs network \[16, 512\].*set model.network=mbf "
                                            r"model.embedding_size=8", network="mbf", embedding_size=16)


def test_truncated_file_is_named(saved, tmp_path):
    path = tmp_path / "truncated.pth"
    data = open(saved, "rb").read()
    path.write_bytes(data[: len(data) // 2])
    _unchanged_after_error(_mbf(), str(path), rf"model.init_from={path}: .*truncated\.pth: cannot be read .*"
                                              r"truncated or corrupted", network="mbf", embedding_size=8)


def _fail_on_one_rank(rank: int, world: int, good: str, bad: str) -> str:
    try:
        load_init_weights(_mbf(), good if rank == 0 else bad, network="mbf", embedding_size=8)
    except InitFromError as error:
        return str(error)
    return "loaded"


def test_a_file_one_rank_cannot_read_stops_every_rank(saved, tmp_path):
    missing = str(tmp_path / "only_on_rank0.pth")
    messages = run_distributed(_fail_on_one_rank, 2, saved, missing)
    assert "loading failed on another rank" in messages[0]
    assert f"model.init_from={missing}: no such file" in messages[1]


# ---------------------------------------------------------------------------------------------
# class_mean

EMB, NUM_CLASSES, BATCH, IN = 6, 7, 4, 5
INIT_STD, ALPHA = 0.01, 10.0


class _Linear(torch.nn.Module):
    """A backbone standing in for a network: images (B, IN) -> embeddings (B, EMB)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.fc = torch.nn.Linear(IN, EMB)

    def forward(self, x):
        return self.fc(x)


def _data(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 0, 1, 2, 2, 3, 4])  # class 5 and 6: no image
    return torch.randn(len(labels), IN, generator=generator), labels


def _rank_batches(images, labels, rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Contiguous uneven shards, batches of BATCH, the same number of batches on every rank."""
    bounds = [len(labels) * r // world for r in range(world + 1)]
    start, end = bounds[rank], bounds[rank + 1]
    most = max(bounds[r + 1] - bounds[r] for r in range(world))
    return [(images[i:min(i + BATCH, end)], labels[i:min(i + BATCH, end)])
            for i in range(start, start + math.ceil(most / BATCH) * BATCH, BATCH)]


def _warm_start(rank: int, world: int) -> dict:
    from largefr.distributed.collectives import group_rank

    images, labels = _data()
    margin = ShardedMarginHead(NUM_CLASSES, EMB, margin=HeadConfig(), init_std=INIT_STD,
                               generator=torch.Generator().manual_seed(1))
    head = ClusterGuidedHead(margin, ClusterConfig(queue_size=64, num_sampled_centers=4, alpha=ALPHA))
    random_rows = margin.weight.detach().clone()
    done = class_mean_warm_start(head, _Linear(), _rank_batches(images, labels, rank, world), alpha=ALPHA,
                                 init_std=INIT_STD, device=torch.device("cpu"), batch_size=BATCH, progress=False)
    bank = head.bank
    return {"start": margin.partition.start, "weight": margin.weight.detach().clone(), "random": random_rows,
            "centers": bank.centers.clone(), "phi": bank.phi.clone(), "has_phi": bank.has_phi.clone(),
            "seen": bank.seen.clone(), "count": bank.queue_count.clone(), "done": done, "rank": group_rank(None)}


def _dense_reference() -> dict[int, tuple[torch.Tensor, float, int]]:
    """class -> (normalized mean of normalized embeddings, phi by Eq. 1 with the RMS distance, count), float64."""
    images, labels = _data()
    with torch.no_grad():
        features = F.normalize(_Linear().double()(images.double()), dim=1)
    out = {}
    for k in labels.unique().tolist():
        members = features[labels == k]
        center = F.normalize(members.mean(0), dim=0)
        rms = ((members - center).norm(dim=1) ** 2).mean().sqrt()
        out[k] = (center, float(rms / math.log(len(members) + ALPHA)), len(members))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_class_mean_sets_w_rows_bank_rows_and_phi(world):
    reference = _dense_reference()
    results = run_distributed(_warm_start, world)
    for result in results:
        assert result["done"] == {"classes": 5.0, "images": 17.0, "num_classes": float(NUM_CLASSES)}
        for local in range(result["weight"].shape[0]):
            k = result["start"] + local
            if k not in reference:  # no image: the random row stays, no center
                torch.testing.assert_close(result["weight"][local], result["random"][local], rtol=0, atol=0)
                assert not result["seen"][local] and not result["has_phi"][local]
                continue
            center, phi, count = reference[k]
            torch.testing.assert_close(result["weight"][local].double(), center * INIT_STD * math.sqrt(EMB),
                                       rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(result["centers"][local].double(), center, rtol=1e-5, atol=1e-6)
            assert result["phi"][local].item() == pytest.approx(phi, rel=1e-4, abs=1e-7)
            assert bool(result["seen"][local]) and int(result["count"][local]) == count
            assert bool(result["has_phi"][local]) == (count > 1)  # one image: its phi measures nothing
