"""IJB-B/C 1:1 protocol on a generated fixture in insightface's exact layout, against a brute force.

The fixture: synthetic faces pasted at integer offsets into larger "loose crops" (PNG, lossless), with
landmarks = ArcFace template + offset, so that the alignment is an exact translation and the brute
force can embed the original 112 x 112 faces directly.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from largefr.data.synthetic_faces import render_identity_image, sample_identity
from largefr.eval.align import ARCFACE_TEMPLATE, AlignmentError, align_face, estimate_similarity, warp_affine
from largefr.eval.ijb import IJBError, read_ijb_meta, template_features
from largefr.eval.weights import load_backbone
from tests.eval_fixtures import load_tool, quickstart_checkpoint
from tests.test_eval_roc import brute_force_roc, brute_force_tar

# (template id, identity, media id) per image; template 12 has two frames of media 500; media 500
# also appears in template 31 (pooling is per template and media); template ids are not contiguous
IMAGES = [(11, 0, 500), (11, 0, 501), (12, 0, 500), (12, 0, 500), (12, 0, 502), (21, 1, 600),
          (22, 1, 601), (22, 1, 602), (31, 2, 500), (32, 2, 700), (32, 2, 700)]
TEMPLATE_IDENTITY = {11: 0, 12: 0, 21: 1, 22: 1, 31: 2, 32: 2}


def _write_fixture(root: str, seed: int = 0) -> list[dict]:
    """IJBC/meta/*.txt and IJBC/loose_crop/*.png; returns per image its face, score and ids."""
    generator = np.random.default_rng(seed)
    identities = [sample_identity(np.random.default_rng([seed, 7, i])) for i in range(3)]
    os.makedirs(os.path.join(root, "meta"))
    os.makedirs(os.path.join(root, "loose_crop"))
    images = []
    for number, (template, identity, media) in enumerate(IMAGES, start=1):
        face = render_identity_image(identities[identity], generator, 112)
        dx, dy = int(generator.integers(0, 30)), int(generator.integers(0, 20))
        crop = generator.integers(0, 256, size=(112 + dy + 13, 112 + dx + 9, 3), dtype=np.uint8)
        crop[dy:dy + 112, dx:dx + 112] = face
        name = f"{number}.png"
        Image.fromarray(crop).save(os.path.join(root, "loose_crop", name))
        images.append({"name": name, "face": face, "landmarks": ARCFACE_TEMPLATE + [dx, dy],
                       "score": round(float(generator.uniform(0.5, 1.0)), 6), "template": template, "media": media})
    with open(os.path.join(root, "meta", "ijbc_face_tid_mid.txt"), "w") as handle:
        handle.writelines(f"{i['name']} {i['template']} {i['media']}\n" for i in images)
    with open(os.path.join(root, "meta", "ijbc_name_5pts_score.txt"), "w") as handle:
        for i in images:
            handle.write(" ".join([i["name"], *(f"{v:.4f}" for v in i["landmarks"].reshape(-1)), f"{i['score']:.6f}"]))
            handle.write("\n")
    templates = sorted(TEMPLATE_IDENTITY)
    with open(os.path.join(root, "meta", "ijbc_template_pair_label.txt"), "w") as handle:
        for a in range(len(templates)):
            for b in range(a + 1, len(templates)):
                same = TEMPLATE_IDENTITY[templates[a]] == TEMPLATE_IDENTITY[templates[b]]
                handle.write(f"{templates[a]} {templates[b]} {int(same)}\n")
    return images


def _brute_force_scores(model: torch.nn.Module, images: list[dict], pairs: list[tuple[int, int]]) -> list[float]:
    """Flip-sum embedding x detector score; per template: mean per media, sum over media, normalize; cosine."""
    features = []
    with torch.no_grad():
        for image in images:
            pixels = (torch.from_numpy(image["face"]).permute(2, 0, 1).float()[None] - 127.5) / 127.5
            embedding = model(pixels)[0] + model(torch.flip(pixels, dims=[3]))[0]
            features.append([image["score"] * float(v) for v in embedding])
    template_vectors = {}
    for template in TEMPLATE_IDENTITY:
        members = [i for i, image in enumerate(images) if image["template"] == template]
        total = [0.0] * len(features[0])
        for media in sorted({images[i]["media"] for i in members}):
            frames = [features[i] for i in members if images[i]["media"] == media]
            total = [t + sum(f[k] for f in frames) / len(frames) for k, t in enumerate(total)]
        norm = math.sqrt(sum(v * v for v in total))
        template_vectors[template] = [v / norm for v in total]
    return [sum(a * b for a, b in zip(template_vectors[t1], template_vectors[t2])) for t1, t2 in pairs]


@pytest.mark.parametrize("source", ["weights", "checkpoint"])
def test_eval_ijb_tool_matches_brute_force(tmp_path, source):
    checkpoint = quickstart_checkpoint()
    path = checkpoint.weights if source == "weights" else checkpoint.root
    images = _write_fixture(str(tmp_path / "IJBC"))
    out = {"json": str(tmp_path / "ijbc.json"), "roc": str(tmp_path / "roc.png"), "scores": str(tmp_path / "s.npy")}
    status = load_tool("eval_ijb").main([f"--{source}", path, "--ijb-root", str(tmp_path), "--target", "IJBC",
                                        "--batch-size", "4", "--workers", "2", "--json", out["json"],
                                        "--roc", out["roc"], "--scores", out["scores"], "--device", "cpu"])
    assert status == 0
    pair_lines = open(tmp_path / "IJBC" / "meta" / "ijbc_template_pair_label.txt").read().split("\n")[:-1]
    pairs = [(int(line.split()[0]), int(line.split()[1])) for line in pair_lines]
    labels = [line.split()[2] == "1" for line in pair_lines]
    expected = _brute_force_scores(load_backbone(**{source: path}).model, images, pairs)
    np.testing.assert_allclose(np.load(out["scores"]), expected, rtol=0, atol=2e-5)
    result = json.load(open(out["json"]))["result"]
    assert (result["images"], result["templates"], result["pairs"]) == (len(IMAGES), 6, 15)
    if source == "weights":  # the raw short run's scores all lie within ~1e-7 of 1 (eval_fixtures.py)
        assert np.std(expected) > 0.05  # informative scores: a wrong pooling or weighting would show
        points = brute_force_roc(expected, labels)
        for entry in result["tar_at_far"]:
            assert entry["tar"] == pytest.approx(brute_force_tar(points, entry["far_target"]), abs=1e-12)
    assert os.path.getsize(out["roc"]) > 10_000  # a PNG with a drawn curve


def test_template_pooling_is_media_mean_then_sum():
    features = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    templates, pooled = template_features(features, np.array([7, 7, 7, 9]), np.array([1, 1, 2, 1]))
    assert templates.tolist() == [7, 9]
    # template 7: media 1 -> mean (2, 0), media 2 -> (0, 2); sum (2, 2) -> normalized
    np.testing.assert_allclose(pooled, [[math.sqrt(0.5), math.sqrt(0.5)], [math.sqrt(0.5), math.sqrt(0.5)]])
    _, weighted = template_features(features, np.array([7, 7, 7, 9]), np.array([1, 1, 2, 1]),
                                    weights=np.array([1.0, 1.0, 3.0, 1.0]))
    np.testing.assert_allclose(weighted[0], np.array([2.0, 6.0]) / math.sqrt(40.0))


def test_similarity_recovered_from_landmarks():
    angle, scale, shift = 0.3, 1.7, np.array([20.0, -5.0])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    # landmarks in the crop whose image under (scale * rotation, shift) is the template
    landmarks = (np.linalg.inv(scale * rotation) @ (ARCFACE_TEMPLATE - shift).T).T
    matrix = estimate_similarity(landmarks, ARCFACE_TEMPLATE)
    np.testing.assert_allclose(matrix, np.hstack([scale * rotation, shift[:, None]]), atol=1e-9)
    mirrored = ARCFACE_TEMPLATE * [-1.0, 1.0]  # best fit would be a reflection: a rotation is returned
    assert np.linalg.det(estimate_similarity(mirrored, ARCFACE_TEMPLATE)[:, :2]) > 0


def test_warp_matches_per_pixel_bilinear():
    generator = np.random.default_rng(1)
    image = generator.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    angle, scale = 0.4, 1.3
    matrix = np.array([[scale * math.cos(angle), -scale * math.sin(angle), -3.0],
                       [scale * math.sin(angle), scale * math.cos(angle), 2.5]])
    warped = warp_affine(image, matrix, (16, 18))
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
    for y in range(16):
        for x in range(18):
            sx, sy, _ = inverse @ [x, y, 1]
            x0, y0 = math.floor(sx), math.floor(sy)
            for c in range(3):
                value = 0.0
                for yy, xx, w in ((y0, x0, (1 - (sy - y0)) * (1 - (sx - x0))), (y0, x0 + 1, (1 - (sy - y0)) * (sx - x0)),
                                  (y0 + 1, x0, (sy - y0) * (1 - (sx - x0))), (y0 + 1, x0 + 1, (sy - y0) * (sx - x0))):
                    if 0 <= yy < 20 and 0 <= xx < 24:  # black outside the image
                        value += w * float(image[yy, xx, c])
                assert abs(int(warped[y, x, c]) - value) <= 0.5 + 1e-9


def test_align_face_is_exact_for_translated_landmarks():
    face = np.random.default_rng(2).integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
    crop = np.zeros((150, 140, 3), dtype=np.uint8)
    crop[17:129, 9:121] = face
    np.testing.assert_array_equal(align_face(crop, ARCFACE_TEMPLATE + [9, 17]), face)
    with pytest.raises(AlignmentError, match="same position"):
        align_face(crop, np.zeros((5, 2)))


def test_meta_errors_name_file_and_line(tmp_path):
    root = str(tmp_path / "IJBC")
    with pytest.raises(IJBError, match="ijbc_face_tid_mid.txt not found.*folder holding meta/ and loose_crop/"):
        read_ijb_meta(str(tmp_path), "IJBC")
    os.makedirs(os.path.join(root, "meta"))
    meta = os.path.join(root, "meta")
    with open(os.path.join(meta, "ijbc_face_tid_mid.txt"), "w") as handle:
        handle.write("1.jpg 1 10\n2.jpg 2 20\n")
    with open(os.path.join(meta, "ijbc_template_pair_label.txt"), "w") as handle:
        handle.write("1 2 0\n1 3 1\n")
    points = " ".join(["1.0"] * 10)
    with open(os.path.join(meta, "ijbc_name_5pts_score.txt"), "w") as handle:
        handle.write(f"1.jpg {points} 0.9\n3.jpg {points} 0.8\n")
    with pytest.raises(IJBError, match=r"image 2: .*ijbc_face_tid_mid.txt names '2.jpg' but .*names '3.jpg'"):
        read_ijb_meta(str(tmp_path), "IJBC")  # a folder holding IJBC/ is accepted as the root
    with open(os.path.join(meta, "ijbc_name_5pts_score.txt"), "w") as handle:
        handle.write(f"1.jpg {points} 0.9\n2.jpg {points}\n")
    with pytest.raises(IJBError, match=r"ijbc_name_5pts_score.txt:2: expected 12 fields, found 11"):
        read_ijb_meta(root, "IJBC")
    with open(os.path.join(meta, "ijbc_name_5pts_score.txt"), "w") as handle:
        handle.write(f"1.jpg {points} 0.9\n2.jpg {points} 0.8\n")
    with pytest.raises(IJBError, match=r"ijbc_template_pair_label.txt:2: template \[1, 3\] has no image"):
        read_ijb_meta(root, "IJBC")


def test_missing_crop_fails_the_tool_with_its_path(tmp_path, capsys):
    _write_fixture(str(tmp_path / "IJBB"))
    for name in os.listdir(tmp_path / "IJBB" / "meta"):  # the same files serve as IJB-B ones
        os.rename(tmp_path / "IJBB" / "meta" / name, tmp_path / "IJBB" / "meta" / name.replace("ijbc", "ijbb"))
    os.remove(tmp_path / "IJBB" / "loose_crop" / "3.png")
    status = load_tool("eval_ijb").main(["--weights", quickstart_checkpoint().weights, "--ijb-root",
                                        str(tmp_path / "IJBB"), "--target", "IJBB", "--device", "cpu"])
    assert status == 2
    assert "loose_crop/3.png: crop listed in the meta files is missing" in capsys.readouterr().err
