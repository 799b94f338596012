"""Parametric face-like identities rendered with numpy + PIL (no downloads): the renderer behind
`largefr.data.synthetic`.

An identity is a fixed set of face parameters (shape, skin, hair, eyes, brows, nose, mouth,
accessories, marks, skin pattern). Each image of it is rendered with fresh nuisance factors
(pose, expression, background, clothes, lighting, colour cast, blur, noise, occlusion), so raw
pixels barely tell identities apart while a trained network can: geometry and the relative
colours of the face survive every nuisance factor.

Coordinates: faces are built in "face units" (origin at the face centre, y down, the face
about 0.7 x 0.9 units) and mapped to pixels by one affine transform per image. Rendering is
2x super-sampled, then reduced (or blurred down through a lower resolution), which anti-aliases
PIL's polygons cheaply. Rendering plus JPEG encoding runs at about 600 images per CPU second.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 2
_CIRCLE = np.stack([np.cos(np.linspace(0, 2 * np.pi, 24, endpoint=False)),
                    np.sin(np.linspace(0, 2 * np.pi, 24, endpoint=False))], axis=1)
_SKIN_PALETTE = np.array([[255, 224, 196], [241, 194, 125], [224, 172, 105], [198, 134, 66],
                          [141, 85, 36], [92, 58, 38]], dtype=np.float64)
_HAIR_PALETTE = np.array([[20, 17, 15], [60, 40, 25], [110, 75, 40], [170, 130, 75],
                          [225, 195, 130], [150, 60, 30], [190, 190, 190], [235, 235, 235]],
                         dtype=np.float64)
_IRIS_PALETTE = np.array([[70, 45, 25], [110, 75, 40], [60, 110, 170], [80, 130, 80],
                          [120, 120, 130]], dtype=np.float64)
_NOISE_BANKS: dict[int, np.ndarray] = {}
HAIR_STYLES = ("bald", "short", "fringe", "side_part", "spiky", "long", "curly", "afro", "mohawk", "bun")
PATTERNS = ("none", "freckles", "stripes", "spots")
_MIRROR = np.array([-1.0, 1.0])  # multiply face-unit points by it to mirror them left-right
Layer = tuple[np.ndarray, tuple[float, ...], int]  # polygon in face units, RGB, outline width (0 = fill)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FaceIdentity:
    """The fixed parameters of one synthetic identity (all lengths in face units)."""

    face_w: float
    face_h: float
    jaw: float
    skin: tuple[float, float, float]
    hair_style: int
    hair_color: tuple[float, float, float]
    hairline: float
    hair_volume: float
    eye_y: float
    eye_dx: float
    eye_w: float
    eye_h: float
    eye_tilt: float
    iris_color: tuple[float, float, float]
    iris_r: float
    brow_dy: float
    brow_thick: float
    brow_angle: float
    brow_len: float
    nose_len: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lip_thick: float
    lip_color: tuple[float, float, float]
    smile: float
    ear_size: float
    beard: float
    glasses: float
    glasses_color: tuple[float, float, float]
    sunglasses: bool
    earrings: float
    earring_color: tuple[float, float, float]
    headband: float
    headband_color: tuple[float, float, float]
    pattern: int
    pattern_color: tuple[float, float, float]
    pattern_points: tuple[tuple[float, float, float], ...]
    marks: tuple[tuple[float, float, float], ...]


def _color(rng: np.random.Generator, palette: np.ndarray, jitter: float) -> tuple[float, ...]:
    """A random mix of two neighbouring palette colours plus per-channel jitter."""
    i = int(rng.integers(0, len(palette) - 1))
    mix = palette[i] + rng.uniform() * (palette[i + 1] - palette[i])
    return tuple(float(c) for c in np.clip(mix + rng.normal(0, jitter, 3), 0, 255))


def _random_color(rng: np.random.Generator, low: float = 0.0, high: float = 255.0) -> tuple[float, ...]:
    return tuple(float(c) for c in rng.uniform(low, high, 3))


def _hair_color(rng: np.random.Generator) -> tuple[float, ...]:
    """Natural hair colours, or (one in five) a saturated dye."""
    if rng.uniform() < 0.2:
        rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0))
        return tuple(255.0 * c for c in rgb)
    return _color(rng, _HAIR_PALETTE, 12)


def sample_identity(rng: np.random.Generator) -> FaceIdentity:
    """Draw one identity's parameters from ``rng``."""
    u = rng.uniform
    pattern = int(rng.choice(len(PATTERNS), p=[0.4, 0.2, 0.2, 0.2]))
    n_points = {0: 0, 1: 14, 2: 3, 3: 6}[pattern]
    pattern_points = tuple((u(-0.28, 0.28), u(-0.1, 0.35), u(0.012, 0.05)) for _ in range(n_points))
    marks = tuple((u(-0.3, 0.3), u(-0.3, 0.4), u(0.025, 0.05)) for _ in range(int(rng.integers(0, 4))))
    return FaceIdentity(
        face_w=u(0.28, 0.38), face_h=u(0.38, 0.47), jaw=u(0.0, 0.55),
        skin=_color(rng, _SKIN_PALETTE, 10), hair_style=int(rng.integers(0, len(HAIR_STYLES))),
        hair_color=_hair_color(rng), hairline=u(-0.3, -0.12), hair_volume=u(0.03, 0.12),
        eye_y=u(-0.1, 0.02), eye_dx=u(0.1, 0.17), eye_w=u(0.05, 0.085), eye_h=u(0.022, 0.04),
        eye_tilt=u(-0.25, 0.25), iris_color=_color(rng, _IRIS_PALETTE, 10), iris_r=u(0.45, 0.8),
        brow_dy=u(0.04, 0.085), brow_thick=u(0.01, 0.03), brow_angle=u(-0.35, 0.35),
        brow_len=u(0.7, 1.3), nose_len=u(0.08, 0.17), nose_w=u(0.03, 0.07),
        mouth_y=u(0.17, 0.28), mouth_w=u(0.07, 0.15), lip_thick=u(0.012, 0.03),
        lip_color=_color(rng, np.array([[200, 110, 110], [170, 70, 80], [120, 60, 60]]), 15),
        smile=u(-0.03, 0.04), ear_size=u(0.05, 0.09),
        beard=float(u() < 0.25) * u(0.5, 1.0), glasses=float(u() < 0.25) * u(0.8, 1.3),
        glasses_color=_random_color(rng, 0, 200), sunglasses=bool(u() < 0.3),
        earrings=float(u() < 0.3) * u(0.015, 0.03), earring_color=_random_color(rng),
        headband=float(u() < 0.12) * u(0.03, 0.06), headband_color=_random_color(rng),
        pattern=pattern, pattern_color=_random_color(rng),
        pattern_points=pattern_points, marks=marks,
    )


def _ellipse(cx: float, cy: float, rx: float, ry: float, tilt: float = 0.0) -> np.ndarray:
    """Polygon (24 x 2) of a tilted ellipse."""
    c, s = math.cos(tilt), math.sin(tilt)
    pts = _CIRCLE * (rx, ry)
    return np.stack([cx + c * pts[:, 0] - s * pts[:, 1], cy + s * pts[:, 0] + c * pts[:, 1]], axis=1)


def _face_outline(idn: FaceIdentity, n: int = 40) -> np.ndarray:
    """Face outline: an ellipse whose lower half narrows towards the chin by ``jaw``."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    narrowing = 1.0 - idn.jaw * np.clip(np.sin(t), 0, None) ** 2
    return np.stack([idn.face_w * np.cos(t) * narrowing, idn.face_h * np.sin(t)], axis=1)


def _hair_cap(idn: FaceIdentity, style: str) -> list[np.ndarray]:
    """Front hair polygons for one style (empty for bald)."""
    w, h, vol, top = idn.face_w, idn.face_h, idn.hair_volume, idn.hairline
    if style == "bald":
        return []
    if style == "mohawk":
        return [_ellipse(0.0, -h + 0.02, 0.06, 0.1 + 1.5 * vol)]
    t = np.linspace(0.25, -np.pi - 0.25, 30)
    radius = np.ones_like(t)
    if style == "spiky":
        radius = 1 + (np.arange(t.size) % 2) * 2.5 * vol / h
    outer = np.stack([(w + vol) * np.cos(t) * radius, (h + vol) * np.sin(t) * radius], axis=1)
    x_top = w * math.sqrt(max(0.0, 1 - (top / h) ** 2))
    left_drop, right_drop = {"fringe": (0.12, 0.12), "side_part": (0.14, -0.02)}.get(style, (0.0, 0.0))
    inner = np.array([[-w * 0.97, 0.1 * h], [-x_top, top + left_drop], [0.3 * x_top, top + right_drop],
                      [x_top, top + right_drop], [w * 0.97, 0.1 * h]])
    polygons = [np.concatenate([outer, inner])]
    if style == "curly":
        polygons += [_ellipse(x, y, vol * 0.9, vol * 0.9) for x, y in outer[::3]]
    if style == "bun":
        polygons.append(_ellipse(0.0, -h - vol - 0.05, 0.09, 0.07))
    return polygons


def _hair_layers(idn: FaceIdentity, yaw: float) -> list[Layer]:
    """Front hair, then the headband over it."""
    layers = [(_yawed(p, yaw, 0.2), idn.hair_color, 0) for p in _hair_cap(idn, HAIR_STYLES[idn.hair_style])]
    if idn.headband:  # just above the hairline, as wide as the head there
        y, w = idn.hairline - idn.headband, 1.05 * idn.face_w * math.sqrt(1 - (idn.hairline / idn.face_h) ** 2)
        band = np.array([[-w, y], [w, y], [w, idn.hairline], [-w, idn.hairline]])
        layers.append((_yawed(band, yaw, 0.2), idn.headband_color, 0))
    return layers


def _shade(color: tuple[float, ...], factor: float) -> tuple[float, ...]:
    return tuple(min(255.0, c * factor) for c in color)


def _yawed(points: np.ndarray, yaw: float, depth: float) -> np.ndarray:
    """Fake out-of-plane rotation: features nearer the camera shift further sideways."""
    return points * (1.0 - 0.12 * abs(yaw), 1.0) + (0.09 * yaw * depth, 0.0)


def _body_layers(idn: FaceIdentity, rng: np.random.Generator) -> list[Layer]:
    """Clothes, neck, back hair and ears: everything drawn behind the face."""
    w, h = idn.face_w, idn.face_h
    layers: list[Layer] = [(_ellipse(0, h * 2.1, 0.75, 0.6), _random_color(rng), 0),  # clothes
                           (np.array([[-0.45 * w, 0.5 * h], [0.45 * w, 0.5 * h], [0.45 * w, 1.7 * h],
                                      [-0.45 * w, 1.7 * h]]), _shade(idn.skin, 0.85), 0)]
    vol, style = idn.hair_volume, HAIR_STYLES[idn.hair_style]
    if style == "long":
        back = np.array([[-w - vol, -0.2 * h], [w + vol, -0.2 * h], [w + 1.5 * vol, 1.35 * h],
                         [-w - 1.5 * vol, 1.35 * h]])
        layers.append((back, _shade(idn.hair_color, 0.85), 0))
    elif style == "afro":
        layers.append((_ellipse(0.0, -0.1, w + 2.5 * vol + 0.05, h + 1.5 * vol + 0.05), idn.hair_color, 0))
    ear = _ellipse(w * 0.97, 0.0, idn.ear_size * 0.55, idn.ear_size)
    layers += [(ear, _shade(idn.skin, 0.9), 0), (ear * _MIRROR, _shade(idn.skin, 0.9), 0)]
    return layers


def _skin_layers(idn: FaceIdentity, yaw: float) -> list[Layer]:
    """Face, skin pattern, marks and beard."""
    layers: list[Layer] = [(_yawed(_face_outline(idn), yaw, 0.0), idn.skin, 0)]
    pattern = PATTERNS[idn.pattern]
    sx, sy = idn.face_w / 0.33, idn.face_h / 0.42
    for x, y, r in idn.pattern_points:
        if pattern == "freckles":
            shape, color = _ellipse(x * sx, y * sy, r * 0.4, r * 0.4), _shade(idn.skin, 0.72)
        elif pattern == "stripes":
            shape, color = _ellipse(x * sx, y * sy, 3 * r, 0.5 * r, tilt=x), idn.pattern_color
        else:
            shape = _ellipse(x * sx, y * sy, r, r)
            color = tuple(0.5 * a + 0.5 * b for a, b in zip(idn.skin, idn.pattern_color))
        layers.append((_yawed(shape, yaw, 0.8), color, 0))
    for x, y, r in idn.marks:
        layers.append((_yawed(_ellipse(x * sx, y * sy, r * 0.6, r * 0.6), yaw, 0.8), (60, 35, 25), 0))
    if idn.beard > 0:
        t = np.linspace(0.05, np.pi - 0.05, 20)
        narrowing = 1.0 - idn.jaw * np.sin(t) ** 2
        lower = np.stack([idn.face_w * np.cos(t) * narrowing, idn.face_h * np.sin(t)], axis=1)
        top = idn.mouth_y - 0.05 * idn.beard
        upper = np.array([[-0.8 * idn.face_w, top - 0.1], [-0.5 * idn.mouth_w, top],
                          [0.5 * idn.mouth_w, top], [0.8 * idn.face_w, top - 0.1]])
        layers.append((_yawed(np.concatenate([lower, upper]), yaw, 0.7), _shade(idn.hair_color, 0.9), 0))
    if idn.earrings:
        ring = _ellipse(idn.face_w * 0.98, idn.ear_size + idn.earrings, idn.earrings, idn.earrings)
        layers += [(_yawed(ring, yaw, 0.0), idn.earring_color, 0),
                   (_yawed(ring * _MIRROR, yaw, 0.0), idn.earring_color, 0)]
    return layers


def _eye_layers(idn: FaceIdentity, rng: np.random.Generator, yaw: float) -> list[Layer]:
    """Eyes (white, iris, pupil), brows and glasses; per image: openness, gaze, brow raise."""
    openness = 0.15 if rng.uniform() < 0.08 else rng.uniform(0.7, 1.15)
    gaze = rng.uniform(-0.3, 0.3, 2) * (idn.eye_w, idn.eye_h)
    raise_ = rng.uniform(-0.01, 0.02)
    brow_color = _shade(idn.hair_color, 0.8)
    layers: list[Layer] = []
    for side in (-1.0, 1.0):
        cx, tilt = side * idn.eye_dx, -side * idn.eye_tilt
        eye_h = idn.eye_h * openness
        layers.append((_ellipse(cx, idn.eye_y, idn.eye_w, eye_h, tilt), (240, 240, 235), 0))
        iris_r = min(idn.iris_r * idn.eye_w * 0.6, eye_h * 1.05)
        iris_c = (cx + gaze[0], idn.eye_y + gaze[1] * openness)
        layers += [(_ellipse(*iris_c, iris_r, iris_r), idn.iris_color, 0),
                   (_ellipse(*iris_c, iris_r * 0.45, iris_r * 0.45), (15, 12, 12), 0)]
        by, half = idn.eye_y - idn.eye_h - idn.brow_dy - raise_, idn.eye_w * idn.brow_len
        dy = side * half * math.tan(idn.brow_angle) * 0.5
        brow = np.array([[cx - half, by + dy], [cx + half, by - dy],
                         [cx + half, by - dy + idn.brow_thick], [cx - half, by + dy + idn.brow_thick]])
        layers.append((brow, brow_color, 0))
        if idn.glasses > 0:
            frame = _ellipse(cx, idn.eye_y, idn.eye_w * 1.5 * idn.glasses, idn.eye_h * 2.6 * idn.glasses)
            if idn.sunglasses:
                layers.append((frame, _shade(idn.glasses_color, 0.3), 0))
            layers.append((frame, idn.glasses_color, 2))
    if idn.glasses > 0:
        inner = idn.eye_dx - idn.eye_w * 1.5 * idn.glasses
        layers.append((np.array([[-inner, idn.eye_y], [inner, idn.eye_y]]), idn.glasses_color, 2))
    return [(_yawed(points, yaw, 1.0), color, width) for points, color, width in layers]


def _nose_mouth_layers(idn: FaceIdentity, rng: np.random.Generator, yaw: float) -> list[Layer]:
    """Nose and mouth; per image: mouth opening and smile."""
    top, tip = idn.eye_y + 0.02, idn.eye_y + 0.02 + idn.nose_len
    nose = np.array([[-0.25 * idn.nose_w, top], [0.25 * idn.nose_w, top],
                     [idn.nose_w, tip], [-idn.nose_w, tip]])
    nostril = _ellipse(0.45 * idn.nose_w, tip - 0.008, 0.22 * idn.nose_w, 0.1 * idn.nose_w)
    nostril_color = _shade(idn.skin, 0.45)
    layers: list[Layer] = [(_yawed(nose, yaw, 1.6), _shade(idn.skin, 0.82), 0),
                           (_yawed(nostril, yaw, 1.6), nostril_color, 0),
                           (_yawed(nostril * _MIRROR, yaw, 1.6), nostril_color, 0)]
    opening = rng.uniform(0.0, 1.0) if rng.uniform() < 0.35 else 0.0
    smile = idn.smile + rng.uniform(-0.015, 0.015)
    x = np.linspace(-idn.mouth_w, idn.mouth_w, 12)
    curve = idn.mouth_y - smile * (1 - (x / idn.mouth_w) ** 2)
    upper = np.stack([x, curve - idn.lip_thick * (1 - 0.6 * (x / idn.mouth_w) ** 2)], axis=1)
    lower_y = curve + (idn.lip_thick + opening * 0.04) * (1 - (x / idn.mouth_w) ** 2)
    lips = np.concatenate([upper, np.stack([x, lower_y], axis=1)[::-1]])
    layers.append((_yawed(lips, yaw, 1.0), idn.lip_color, 0))
    if opening > 0.2:
        inner = _ellipse(0.0, idn.mouth_y + 0.02 * opening, 0.7 * idn.mouth_w, 0.015 * opening)
        layers.append((_yawed(inner, yaw, 1.0), (50, 20, 25), 0))
    return layers


def _face_layers(idn: FaceIdentity, rng: np.random.Generator) -> list[Layer]:
    """Every polygon of one image of ``idn``, back to front, in face units."""
    yaw = rng.uniform(-1.0, 1.0)
    layers = _body_layers(idn, rng) + _skin_layers(idn, yaw)
    layers += _nose_mouth_layers(idn, rng, yaw) + _eye_layers(idn, rng, yaw)
    return layers + _hair_layers(idn, yaw)


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    """A size x size linear ramp in [-1, 1] along a random direction."""
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    return (math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]) / math.sqrt(2)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Per-image background: a colour gradient in a random direction plus a few random shapes."""
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    # Computed at 8 x 8 and upscaled in two steps: a linear ramp survives it, at a tenth of the cost.
    pixels = (start + end) / 2 + _gradient(rng, 8)[..., None] * (end - start)
    small = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    canvas = small.resize((size // 2, size // 2), Image.BILINEAR).resize((size, size), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 6))):
        x, y = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.05, 0.35, 2) * size
        shape = draw.ellipse if rng.uniform() < 0.5 else draw.rectangle
        shape([x - rx, y - ry, x + rx, y + ry], fill=tuple(int(c) for c in rng.uniform(0, 255, 3)))
    return canvas


def _pose_matrix(rng: np.random.Generator, size: int) -> np.ndarray:
    """2 x 3 map from face units to canvas pixels: in-plane rotation, scale and shift."""
    angle, scale = rng.uniform(-0.12, 0.12), size * rng.uniform(0.92, 1.08)
    shift = size * (0.5 + rng.uniform(-0.04, 0.04, 2)) + (0.0, -0.02 * size)
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    return np.array([[c, -s, shift[0]], [s, c, shift[1]]])


def _draw_layers(canvas: Image.Image, layers: list[Layer], matrix: np.ndarray) -> None:
    draw = ImageDraw.Draw(canvas)
    for points, color, width in layers:
        xy = points @ matrix[:, :2].T + matrix[:, 2]
        flat = [tuple(p) for p in xy.tolist()]
        fill = tuple(int(c) for c in color)
        if width:
            draw.line(flat + flat[:1] if len(flat) > 2 else flat, fill=fill, width=width * SUPERSAMPLE)
        else:
            draw.polygon(flat, fill=fill)


def _occlude(canvas: Image.Image, rng: np.random.Generator) -> None:
    """A random bar or patch (hand, hat brim, microphone...) over part of the face."""
    size = canvas.size[0]
    centre = size * rng.uniform(0.25, 0.75, 2)
    long_side, short_side = size * rng.uniform(0.2, 0.6), size * rng.uniform(0.06, 0.2)
    angle = rng.uniform(0, np.pi)
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * (long_side / 2, short_side / 2)
    xy = corners @ np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]]) + centre
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in xy.tolist()], fill=tuple(int(v) for v in rng.uniform(0, 255, 3)))


def _downsample(canvas: Image.Image, rng: np.random.Generator, image_size: int) -> Image.Image:
    """Back to image_size; sometimes through a lower resolution, which blurs like defocus or distance."""
    if rng.uniform() < 0.5:
        low = max(8, int(image_size / rng.uniform(1.2, 2.3)))
        return canvas.resize((low, low), Image.BILINEAR).resize((image_size, image_size), Image.BILINEAR)
    return canvas.reduce(SUPERSAMPLE)


def _noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal noise as a random window of a fixed bank (one per size, so the same seed gives
    the same noise in any process): drawing fresh normals costs more than the rest of this step."""
    count = int(np.prod(shape))
    if count not in _NOISE_BANKS:
        _NOISE_BANKS[count] = np.random.default_rng(count).standard_normal(4 * count, dtype=np.float32)
    start = int(rng.integers(0, 3 * count))
    return _NOISE_BANKS[count][start:start + count].reshape(shape)


def _photometric(image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """Colour cast, brightness, contrast, directional light and sensor noise."""
    pixels = np.array(image, dtype=np.float32)
    if rng.uniform() < 0.05:
        pixels = np.repeat(pixels.mean(axis=2, keepdims=True), 3, axis=2)
    light = 1 + rng.uniform(0, 0.6) * _gradient(rng, pixels.shape[0])
    gain = (rng.uniform(0.65, 1.25) * np.exp(rng.normal(0, 0.12, 3))).astype(np.float32)
    mean = float(pixels.mean())
    pixels -= mean  # in place from here on: this step is a quarter of the render time
    pixels *= rng.uniform(0.65, 1.25)
    pixels += mean
    pixels *= light[..., None]
    pixels *= gain
    pixels += rng.uniform(0, 8) * _noise(rng, pixels.shape)
    np.clip(pixels, 0, 255, out=pixels)
    return pixels.astype(np.uint8)


def render_identity_image(identity_params: FaceIdentity, rng: np.random.Generator,
                          image_size: int = 112) -> np.ndarray:
    """One image (image_size x image_size x 3, uint8 RGB) of an identity under random nuisance factors."""
    size = image_size * SUPERSAMPLE
    canvas = _background(rng, size)
    _draw_layers(canvas, _face_layers(identity_params, rng), _pose_matrix(rng, size))
    if rng.uniform() < 0.3:
        _occlude(canvas, rng)
    return _photometric(_downsample(canvas, rng, image_size), rng)
