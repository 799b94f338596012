"""10-fold verification accuracy against a plain brute-force computation of insightface's protocol."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from largefr.eval.verification import embed_images, kfold_splits, verification_accuracy
from tests.distributed_helpers import run_distributed


def _brute_force(embeddings: np.ndarray, issame: list[bool], folds: int) -> tuple[float, float]:
    """Loops written out: normalize, squared distance, folds of sklearn KFold, best train threshold."""
    normalized = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in embeddings.tolist()]
    distances = [sum((a - b) ** 2 for a, b in zip(normalized[2 * i], normalized[2 * i + 1]))
                 for i in range(len(issame))]
    n = len(issame)
    sizes = [n // folds + (1 if f < n % folds else 0) for f in range(folds)]
    thresholds = [i * 0.01 for i in range(400)]
    accuracies, start = [], 0
    for size in sizes:
        test = list(range(start, start + size))
        train = [i for i in range(n) if i not in test]
        start += size

        def accuracy(indices, threshold):
            return sum((distances[i] < threshold) == issame[i] for i in indices) / len(indices)

        best_threshold, best_accuracy = None, -1.0
        for threshold in thresholds:
            value = accuracy(train, threshold)
            if value > best_accuracy:  # first maximum, as np.argmax
                best_threshold, best_accuracy = threshold, value
        accuracies.append(accuracy(test, best_threshold))
    mean = sum(accuracies) / folds
    return mean, math.sqrt(sum((a - mean) ** 2 for a in accuracies) / folds)


@pytest.mark.parametrize("pairs,folds", [(103, 10), (60, 5)])
def test_accuracy_equals_brute_force(pairs, folds):
    generator = np.random.default_rng(pairs)
    issame = (generator.random(pairs) < 0.5).tolist()
    base = generator.normal(size=(pairs, 8))
    other = np.where(np.array(issame)[:, None], base + 0.7 * generator.normal(size=(pairs, 8)),
                     generator.normal(size=(pairs, 8)))
    embeddings = np.stack([base, other], axis=1).reshape(2 * pairs, 8)
    result = verification_accuracy(embeddings, issame, num_folds=folds)
    expected_mean, expected_std = _brute_force(embeddings, issame, folds)
    assert result.accuracy == pytest.approx(expected_mean, abs=1e-12)
    assert result.std == pytest.approx(expected_std, abs=1e-12)
    assert 0.6 < result.accuracy < 1.0  # informative embeddings, not a degenerate case


def test_random_embeddings_score_near_chance():
    generator = np.random.default_rng(0)
    embeddings = generator.normal(size=(2000, 16))
    issame = (generator.random(1000) < 0.5).tolist()
    assert abs(verification_accuracy(embeddings, issame).accuracy - 0.5) < 0.06


def test_kfold_sizes_follow_sklearn():
    splits = kfold_splits(23, 10)
    assert [len(test) for _, test in splits] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert all(len(train) + len(test) == 23 for train, test in splits)


def test_pair_count_mismatch_rejected():
    with pytest.raises(ValueError, match="5 embeddings for 3 pairs"):
        verification_accuracy(np.zeros((5, 2)), [True, False, True])


class _Asymmetric(torch.nn.Module):
    """Embedding = left-right weighted column sums: a flip changes it."""

    def forward(self, x):
        weights = torch.linspace(0.0, 1.0, x.shape[3])
        return torch.stack([(x * weights).sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3))], dim=1)


def test_flip_adds_mirrored_embedding():
    images = torch.randn(5, 3, 4, 6)
    model = _Asymmetric()
    flipped = embed_images(model, images, batch_size=2, flip=True)
    expected = model(images) + model(torch.flip(images, dims=[3]))
    torch.testing.assert_close(flipped, expected)
    torch.testing.assert_close(embed_images(model, images, batch_size=3, flip=False), model(images))


def test_uint8_pixels_are_normalized_like_the_loaders():
    pixels = torch.randint(0, 256, (3, 3, 4, 6), dtype=torch.uint8)
    expected = _Asymmetric()((pixels.float() - 127.5) / 127.5)
    torch.testing.assert_close(embed_images(_Asymmetric(), pixels, batch_size=2, flip=False), expected)


def _distributed_embed(rank: int, world: int, images: torch.Tensor) -> torch.Tensor:
    from largefr.eval.verification import embed_images_distributed, share_range

    start, end = share_range(images.shape[0], world, rank)
    return embed_images_distributed(_Asymmetric(), images[start:end], batch_size=2, embedding_size=2)


def test_distributed_embedding_matches_single_process():
    images = torch.randn(5, 3, 4, 6)  # 5 images on 4 ranks: shares 2, 2, 1, 0 (an empty share still gathers)
    expected = embed_images(_Asymmetric(), images, batch_size=4)
    for result in run_distributed(_distributed_embed, 4, images):
        torch.testing.assert_close(result, expected)


def test_share_and_bin_roundtrip(tmp_path):
    from PIL import Image

    from largefr.data.verification_bin import write_bin
    from largefr.eval.verification import load_verification_share

    encoded = []
    for value in range(6):
        buffer = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 40 * value, dtype=np.uint8)).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    path = str(tmp_path / "tiny.bin")
    write_bin(path, encoded, [True, False, True])
    shares = [load_verification_share(path, image_size=8, rank=r, world_size=4) for r in range(4)]
    assert [s[0].shape[0] for s in shares] == [2, 2, 2, 0]
    pixels = torch.cat([s[0] for s in shares])
    assert pixels.dtype == torch.uint8 and pixels[:, 0, 0, 0].tolist() == [40 * v for v in range(6)]
    assert all(s[1] == [True, False, True] and s[2] == 6 for s in shares)
