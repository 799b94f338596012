"""5-point face alignment to the ArcFace 112 x 112 template (as insightface aligns IJB loose crops).

A similarity transform (rotation, uniform scale, translation) is fitted by least squares from the
five detected landmarks (left eye, right eye, nose tip, left and right mouth corner, in pixels of the
crop) to the template (Umeyama's method, as skimage's `SimilarityTransform.estimate`), then the
crop is warped with bilinear interpolation and black outside it, like `cv2.warpAffine(...,
borderValue=0)`: pixel centers at integer coordinates. Unlike OpenCV the sampling positions are not
rounded to 1/32 pixel, so pixels can differ from insightface's by a grey level or so.
"""
from __future__ import annotations

import numpy as np

from largefr.errors import UserError

ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
"""Landmark positions in an aligned 112 x 112 face (insightface's `arcface_dst`)."""


class AlignmentError(UserError, ValueError):
    """Landmarks from which no similarity transform can be fitted."""


def estimate_similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """2 x 3 matrix M of the least-squares similarity with M @ [x, y, 1] ~ target, for each source point."""
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 2 or source.shape[0] < 2:
        raise AlignmentError(f"need matching N x 2 point sets (N >= 2), got {source.shape} and {target.shape}")
    if not np.isfinite(source).all():
        raise AlignmentError("landmarks hold NaN or infinite values")
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    source_centered, target_centered = source - source_mean, target - target_mean
    source_variance = np.square(source_centered).sum() / source.shape[0]
    if source_variance < 1e-12:
        raise AlignmentError("all landmarks are at the same position")
    covariance = target_centered.T @ source_centered / source.shape[0]
    u, singular, vt = np.linalg.svd(covariance)
    signs = np.ones(2)
    if np.linalg.det(covariance) < 0:  # best fit is a reflection: take the best proper rotation instead
        signs[-1] = -1.0
    rotation = u @ np.diag(signs) @ vt
    scale = float(singular @ signs) / source_variance
    translation = target_mean - scale * rotation @ source_mean
    return np.hstack([scale * rotation, translation[:, None]])


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (height, width) = `size` image whose pixel p shows `image` at M^-1 p (bilinear, black outside)."""
    height, width = size
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    source_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    source_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    x0, y0 = np.floor(source_x).astype(np.int64), np.floor(source_y).astype(np.int64)
    fx, fy = (source_x - x0)[..., None], (source_y - y0)[..., None]
    pixels = image.astype(np.float64)

    def at(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        inside = (x >= 0) & (x < image.shape[1]) & (y >= 0) & (y < image.shape[0])
        values = pixels[np.clip(y, 0, image.shape[0] - 1), np.clip(x, 0, image.shape[1] - 1)]
        return values * inside[..., None]

    blended = ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1))
               + fy * ((1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)))
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def align_face(image: np.ndarray, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """image_size x image_size x 3 uint8 face aligned from H x W x 3 `image` by its 5 landmarks."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise AlignmentError(f"expected an H x W x 3 image, got shape {image.shape}")
    template = ARCFACE_TEMPLATE * (image_size / 112.0)
    matrix = estimate_similarity(np.asarray(landmarks, dtype=np.float64).reshape(5, 2), template)
    return warp_affine(image, matrix, (image_size, image_size))
