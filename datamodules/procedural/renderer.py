"""Procedural face renderer: identity parameters + an AU vector -> a small uint8 face image.

Everything is drawn as polygons with PIL.ImageDraw in a canonical face frame (x right, y down,
the canvas spans [-1, 1] on both axes, eyes near y=-0.12, mouth near y=0.45), mapped to pixels by
one similarity transform (the per-image pose). Drawing happens at SUPERSAMPLE x the output size
and is box-downsampled, which antialiases the edges. Pure numpy + PIL, no assets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from datamodules.procedural.aus import AU_INDEX, NUM_AUS

# Drawing cost is dominated by per-primitive Python overhead, not fill area, so 4x costs little.
SUPERSAMPLE = 4

HAIR_STYLES = ("bald", "short", "side_part", "bangs", "long", "curly")
AGES = ("young", "middle-aged", "older")
GENDERS = ("woman", "man")

_SKIN_TONES = np.array([  # light -> dark; identities interpolate between neighbours
    (250, 221, 200), (236, 196, 168), (222, 172, 134), (196, 142, 104),
    (160, 108, 74), (120, 78, 52), (88, 58, 40),
], dtype=np.float64)
_HAIR_COLOURS = np.array([
    (25, 20, 18), (55, 38, 28), (95, 64, 40), (150, 110, 70),
    (210, 175, 110), (150, 70, 35), (170, 170, 170), (225, 225, 220),
], dtype=np.float64)
_IRIS_COLOURS = np.array([(60, 40, 25), (95, 65, 40), (70, 100, 130), (80, 110, 70)], dtype=np.float64)


@dataclass
class Identity:
    """One person: a seeded set of shape and appearance parameters (canonical-frame units)."""

    seed: int
    gender: str            # "woman" | "man" (caption word; shifts hair/brow/jaw priors)
    age: str               # "young" | "middle-aged" | "older" (caption word; wrinkles, grey hair)
    face_width: float      # half width of the head
    chin_y: float          # y of the chin with the jaw closed
    jaw_power: float       # <1 square jaw, >1 pointed chin
    skin: tuple            # RGB floats
    eye_spacing: float     # x of each eye centre
    eye_width: float       # half width of an eye
    eye_open: float        # upper-lid height at rest
    eye_tilt: float        # outer corner raise
    iris: tuple
    brow_gap: float        # brow height above the eye centre at rest
    brow_thickness: float
    brow_arch: float
    brow_colour: tuple
    hair_colour: tuple
    hair_style: str
    hair_volume: float     # 0..1
    hairline_y: float
    nose_width: float
    nose_y: float
    mouth_width: float     # half width at rest
    mouth_y: float
    lip_thickness: float
    lip_colour: tuple
    beard: float           # 0 none, else stubble/beard strength
    wrinkles: float        # 0..1 resting wrinkle depth (age)
    background: tuple
    shirt: tuple


def _mix(a, b, t: float) -> tuple:
    return tuple(float(x) * (1.0 - t) + float(y) * t for x, y in zip(a, b))


def sample_identity(rng: np.random.Generator, seed: int = -1) -> Identity:
    """Draw a random identity; `seed` is only recorded (pass the seed that made `rng`)."""
    gender = GENDERS[int(rng.integers(2))]
    age = AGES[int(rng.choice(3, p=[0.5, 0.3, 0.2]))]
    man = gender == "man"

    tone = rng.uniform(0, len(_SKIN_TONES) - 1)
    lo = int(tone)
    skin = _mix(_SKIN_TONES[lo], _SKIN_TONES[min(lo + 1, len(_SKIN_TONES) - 1)], tone - lo)

    if age == "older" and rng.random() < 0.7:
        hair = _HAIR_COLOURS[int(rng.integers(6, 8))]
    elif tone > 3.5:  # darker skin: mostly dark hair
        hair = _HAIR_COLOURS[int(rng.integers(0, 2))]
    else:
        hair = _HAIR_COLOURS[int(rng.integers(0, 6))]
    hair = tuple(np.clip(hair * rng.uniform(0.85, 1.15), 0, 255))

    style_p = [0.12, 0.4, 0.25, 0.08, 0.05, 0.1] if man else [0.0, 0.08, 0.14, 0.22, 0.42, 0.14]
    style = HAIR_STYLES[int(rng.choice(len(HAIR_STYLES), p=style_p))]
    brow_colour = _mix(hair, (30, 22, 18), 0.5 if hair[0] > 140 else 0.2)

    lip_base = _mix(skin, (190, 70, 80), rng.uniform(0.25, 0.45) if man else rng.uniform(0.4, 0.7))
    background = tuple(rng.uniform(60, 220, size=3) * rng.uniform(0.6, 1.0))
    return Identity(
        seed=int(seed),
        gender=gender,
        age=age,
        face_width=rng.uniform(0.62, 0.74) + (0.03 if man else 0.0),
        chin_y=rng.uniform(0.80, 0.92),
        jaw_power=rng.uniform(0.55, 0.8) if man else rng.uniform(0.75, 1.1),
        skin=skin,
        eye_spacing=rng.uniform(0.25, 0.32),
        eye_width=rng.uniform(0.13, 0.16),
        eye_open=rng.uniform(0.06, 0.08),
        eye_tilt=rng.uniform(-0.01, 0.025),
        iris=tuple(_IRIS_COLOURS[int(rng.integers(len(_IRIS_COLOURS)))]),
        brow_gap=rng.uniform(0.15, 0.19),
        brow_thickness=rng.uniform(0.035, 0.06) if man else rng.uniform(0.022, 0.042),
        brow_arch=rng.uniform(0.01, 0.05),
        brow_colour=brow_colour,
        hair_colour=hair,
        hair_style=style,
        hair_volume=rng.uniform(0.0, 1.0),
        hairline_y=rng.uniform(-0.72, -0.6) + (0.05 if age == "older" and man else 0.0),
        nose_width=rng.uniform(0.075, 0.11),
        nose_y=rng.uniform(0.16, 0.22),
        mouth_width=rng.uniform(0.17, 0.22),
        mouth_y=rng.uniform(0.44, 0.49),
        lip_thickness=rng.uniform(0.028, 0.045) if man else rng.uniform(0.035, 0.055),
        lip_colour=lip_base,
        beard=rng.uniform(0.25, 0.6) if man and rng.random() < 0.25 else 0.0,
        wrinkles={"young": 0.0, "middle-aged": 0.2, "older": 0.45}[age] * rng.uniform(0.6, 1.4),
        background=background,
        shirt=tuple(rng.uniform(20, 230, size=3)),
    )


# ---------------------------------------------------------------- geometry helpers (canonical frame)

# Quadratic Bernstein basis per point count: curve = basis @ [p0, p1, p2].
_BERNSTEIN = {n: np.stack([(1 - t) ** 2, 2 * (1 - t) * t, t ** 2], 1)
              for n in (5, 7, 9, 13) for t in [np.linspace(0.0, 1.0, n)]}
_BROW_TAPER = np.linspace(0.6, 0.3, 9)    # brows thin out towards the temple
_LASH_TAPER = np.linspace(0.008, 0.016, 9)  # lash line thickens towards the outer corner
_UPPER_ANGLES = np.linspace(np.pi, 0.0, 13)
_LOWER_ANGLES = np.linspace(0.0, np.pi / 2, 9)
_CIRCLE = {n: np.stack([np.cos(a), np.sin(a)], 1) for n in (12, 20, 32)
           for a in [np.linspace(0, 2 * np.pi, n, endpoint=False)]}


def _quad(p0, p1, p2, n: int = 9) -> np.ndarray:
    """Quadratic Bezier points (n x 2) from p0 to p2 with control p1."""
    return _BERNSTEIN[n] @ np.array((p0, p1, p2), dtype=np.float64)


def _through(p0, mid, p2, n: int = 9) -> np.ndarray:
    """Quadratic curve from p0 to p2 passing through `mid` at t=0.5."""
    ctrl = (2 * mid[0] - 0.5 * (p0[0] + p2[0]), 2 * mid[1] - 0.5 * (p0[1] + p2[1]))
    return _quad(p0, ctrl, p2, n)


def _ellipse(cx, cy, rx, ry, n: int = 20) -> np.ndarray:
    return _CIRCLE[n] * (rx, ry) + (cx, cy)


def _ribbon(pts: np.ndarray, half_width) -> np.ndarray:
    """A closed polygon of a stroke along `pts`; half_width may be a per-point array (tapering)."""
    d = np.empty_like(pts)  # central differences (np.gradient is slow for tiny arrays)
    d[1:-1] = pts[2:] - pts[:-2]
    d[0], d[-1] = pts[1] - pts[0], pts[-1] - pts[-2]
    length = np.sqrt(d[:, 0] ** 2 + d[:, 1] ** 2) + 1e-9
    scale = np.reshape(half_width, (-1,)) / length
    off = np.empty_like(pts)
    off[:, 0], off[:, 1] = -d[:, 1] * scale, d[:, 0] * scale
    return np.concatenate([pts + off, (pts - off)[::-1]])


def _rgb(c) -> tuple:
    return (int(c[0]), int(c[1]), int(c[2]))


class _Canvas:
    """Draws canonical-frame polygons through a similarity transform (pose + supersampling)."""

    def __init__(self, px: int, background, angle: float, scale: float, shift) -> None:
        self.image = Image.new("RGB", (px, px), _rgb(background))
        self.draw = ImageDraw.Draw(self.image)
        unit = scale * px / 2.0  # pixels per canonical unit
        c, s = math.cos(angle) * unit, math.sin(angle) * unit
        self.matrix = np.array([[c, -s], [s, c]])
        self.offset = np.array([px / 2.0 + shift[0] * px / 2.0, px / 2.0 + shift[1] * px / 2.0])
        self.unit = unit

    def _xy(self, pts: np.ndarray) -> list:
        return (pts @ self.matrix.T + self.offset).ravel().tolist()

    def poly(self, pts: np.ndarray, fill) -> None:
        self.draw.polygon(self._xy(pts), fill=_rgb(fill))

    def stroke(self, pts: np.ndarray, half_width, fill) -> None:
        """A line along `pts`; a per-point half_width array draws a tapered ribbon instead."""
        # Strokes thinner than ~0.7 output px vanish after downsampling; keep them at least that wide.
        min_px = 0.7 * SUPERSAMPLE
        if np.ndim(half_width) == 0:  # constant width: PIL's native line is ~4x cheaper than a ribbon
            width = max(int(round(2.0 * half_width * self.unit)), math.ceil(min_px))
            self.draw.line(self._xy(pts), fill=_rgb(fill), width=width, joint="curve")
        else:
            self.poly(_ribbon(pts, np.maximum(half_width, 0.5 * min_px / self.unit)), fill)


# ---------------------------------------------------------------- the face


def render_face(
    identity: Identity,
    aus: np.ndarray,
    size: int = 64,
    channels: int = 3,
    rng: Optional[np.random.Generator] = None,
) -> np.ndarray:
    """Render one face as a uint8 array of shape (size, size, channels).

    aus: intensities in [0, 1] ordered as `aus.AU_NAMES`.
    rng: per-image jitter (pose, gaze, unilateral side, lighting, pixel noise). None renders a
         frontal, evenly lit, noise-free face, which is what tests comparing AUs want.
    """
    aus = np.asarray(aus, dtype=np.float64)
    if aus.shape != (NUM_AUS,):
        raise ValueError(f"aus must have shape ({NUM_AUS},) ordered as AU_NAMES, got {aus.shape}")
    if not np.isfinite(aus).all():
        raise ValueError(f"aus must be finite intensities in [0, 1], got {aus.tolist()}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    a = dict(zip(AU_INDEX, np.clip(aus, 0.0, 1.0).tolist()))

    if rng is None:
        angle, scale, shift, yaw, gaze, side = 0.0, 1.0, (0.0, 0.0), 0.0, 0.0, 1.0
    else:
        angle = float(np.clip(rng.normal(0.0, 0.09), -0.2, 0.2))
        scale = rng.uniform(0.9, 1.06)
        shift = rng.uniform(-0.06, 0.06, size=2)
        yaw = rng.uniform(-1.0, 1.0)
        gaze = rng.uniform(-0.3, 0.3)
        side = 1.0 if rng.random() < 0.5 else -1.0

    canvas = _Canvas(size * SUPERSAMPLE, identity.background, angle, scale, shift)
    _draw_face(canvas, identity, a, yaw, gaze, side)

    img = canvas.image.reduce(SUPERSAMPLE)
    if channels == 1:
        img = img.convert("L")
    if rng is None:
        arr = np.array(img, dtype=np.uint8)  # a writable copy, not a view of PIL's buffer
    else:
        arr = np.clip(_lighting(np.asarray(img, dtype=np.float32), size, rng), 0, 255).astype(np.uint8)
    return arr[:, :, None] if channels == 1 else arr


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}
_NOISE_BANK = np.random.default_rng(20240501).standard_normal(1 << 19, dtype=np.float32)


def _lighting(arr: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Directional brightness gradient, exposure/contrast/tint jitter and sensor noise."""
    if size not in _GRIDS:
        lin = np.linspace(-1.0, 1.0, size, dtype=np.float32)
        _GRIDS[size] = (lin[None, :], lin[:, None])
    gx, gy = _GRIDS[size]
    phi = rng.uniform(0, 2 * np.pi)
    strength = rng.uniform(0.0, 0.3)
    gain = (1.0 + strength * (math.cos(phi) * gx + math.sin(phi) * gy)) * rng.uniform(0.8, 1.12)
    if arr.ndim == 3:
        gain = gain[:, :, None] * rng.uniform(0.96, 1.04, size=3).astype(np.float32)
    contrast = rng.uniform(0.8, 1.1)
    sigma = rng.uniform(1.0, 6.0)
    # (arr * gain - 128) * contrast + 128 + noise, folded into few in-place passes
    out = arr * (gain * contrast)
    # Gaussian noise from a random window of a fixed bank: drawing fresh normals costs more than
    # the whole face, and a shifted window is just as uncorrelated with the image.
    if arr.size < _NOISE_BANK.size:
        start = int(rng.integers(0, _NOISE_BANK.size - arr.size))
        noise = _NOISE_BANK[start:start + arr.size].reshape(arr.shape)
    else:  # very large renders
        noise = rng.standard_normal(arr.shape, dtype=np.float32)
    out += noise * np.float32(sigma)
    out += 128.0 * (1.0 - contrast)
    return out


@dataclass(frozen=True)
class _Tones:
    """The skin of one face and the two darker tones its lines are drawn in."""

    skin: tuple
    shade: tuple  # creases and outlines
    deep: tuple  # strong folds


@dataclass(frozen=True)
class _Mouth:
    """Mouth geometry in the canonical frame: corners, inner and outer lip lines."""

    mx: float
    mw: float
    left: tuple  # corners
    right: tuple
    upper_inner_y: float
    lower_inner_y: float
    lower_t: float
    upper_in: np.ndarray
    lower_in: np.ndarray
    bow: np.ndarray  # outer upper-lip line (cupid's bow)
    lower_out: np.ndarray


def _draw_face(cv: _Canvas, idt: Identity, a: dict, yaw: float, gaze: float, side: float) -> None:
    """Back to front: hair behind the head, neck, head, beard, hair, forehead, brows, eyes, nose, mouth."""
    tones = _Tones(idt.skin, _mix(idt.skin, (40, 20, 15), 0.22), _mix(idt.skin, (30, 12, 10), 0.5))
    # Head turn: inner features slide sideways, more the further they stick out (nose, mouth).
    dx_eyes, dx_nose = 0.04 * yaw, 0.07 * yaw
    _draw_behind_head(cv, idt, tones)
    lower = _draw_head(cv, idt, tones, chin_y=idt.chin_y + 0.16 * a["AU26"] + 0.03 * a["AU25"])
    if idt.beard > 0:  # on the lower face, moves with the jaw
        beard_pts = lower[lower[:, 1] > 0.18]
        cheek_line = _through((beard_pts[-1, 0], 0.18), (0.0 + dx_nose, 0.34), (beard_pts[0, 0], 0.18), 7)
        cv.poly(np.concatenate([beard_pts, cheek_line]), _mix(idt.skin, idt.hair_colour, idt.beard))
    if idt.hair_style != "bald":  # drawn after the head so it covers the forehead down to the hairline
        _draw_top_hair(cv, idt)
    _draw_forehead_lines(cv, idt, a, tones)
    _draw_brows(cv, idt, a, tones, dx_eyes)
    _draw_eyes(cv, idt, a, tones, dx_eyes, gaze)
    nose = _draw_nose(cv, idt, a, tones, dx_nose)
    mouth = _mouth_shape(idt, a, dx_nose, side)
    _draw_mouth_folds(cv, idt, a, tones, mouth, nose, side)
    _draw_lips(cv, idt, tones, mouth)


def _draw_behind_head(cv: _Canvas, idt: Identity, tones: _Tones) -> None:
    """Long or curly hair behind the head, the neck and the shoulders."""
    W, hair = idt.face_width, idt.hair_colour
    if idt.hair_style == "long":
        back = _ellipse(0.0, -0.05, W * (1.2 + 0.15 * idt.hair_volume), 1.15, 32)
        back[:, 1] = np.minimum(back[:, 1], 1.1)
        cv.poly(back, hair)
    elif idt.hair_style == "curly":
        n = 32
        bump = 1.0 + 0.06 * np.cos(np.arange(n) * 2 * np.pi * 8 / n)
        back = _CIRCLE[n] * (W * (1.25 + 0.2 * idt.hair_volume), 0.95) * bump[:, None] + (0.0, -0.3)
        cv.poly(back, hair)
    cv.poly(np.array([[-0.3 * W, 0.3], [0.3 * W, 0.3], [0.36 * W, 1.2], [-0.36 * W, 1.2]]), tones.shade)
    cv.poly(_ellipse(0.0, 1.42, 1.3, 0.45, 20), idt.shirt)


def _draw_head(cv: _Canvas, idt: Identity, tones: _Tones, chin_y: float) -> np.ndarray:
    """Ears and head outline (upper half ellipse, lower half tapering to the chin, which AU25/AU26 lower).
    Returns the lower outline, where a beard goes."""
    W, cheek_y = idt.face_width, 0.0
    for s in (-1.0, 1.0):
        cv.poly(_ellipse(s * W * 0.98, -0.08, 0.09, 0.16, 12), tones.shade)
    up = _UPPER_ANGLES
    top = np.stack([W * np.cos(up), cheek_y - (cheek_y + 1.05) * np.sin(up)], 1)
    down = _LOWER_ANGLES
    half = np.stack([W * np.cos(down) ** idt.jaw_power, cheek_y + (chin_y - cheek_y) * np.sin(down)], 1)
    lower = np.concatenate([half, half[-2::-1] * (-1.0, 1.0)])
    cv.poly(np.concatenate([top, lower]), tones.skin)
    return lower


def _draw_top_hair(cv: _Canvas, idt: Identity) -> None:
    """Hair on top of the head, down to the hairline of the identity's style."""
    vol, W, up = idt.hair_volume, idt.face_width, _UPPER_ANGLES
    rx, top_y = W * (1.04 + 0.08 * vol), -1.05 - 0.12 * vol
    arc = np.stack([rx * np.cos(up), -0.25 - (top_y + 0.25) * -np.sin(up)], 1)
    hl = idt.hairline_y
    if idt.hair_style == "side_part":
        line = _through((rx, -0.25), (0.25 * W, hl - 0.04), (-rx, -0.3), 9)
    elif idt.hair_style == "bangs":
        line = _through((rx, -0.3), (0.0, hl + 0.08), (-rx, -0.3), 13)
        line[1:-1:2, 1] -= 0.05  # a jagged fringe
    else:
        line = _through((rx, -0.28), (0.0, hl), (-rx, -0.28), 9)
    cv.poly(np.concatenate([arc, line]), idt.hair_colour)


def _draw_forehead_lines(cv: _Canvas, idt: Identity, a: dict, tones: _Tones) -> None:
    """AU1 (centre) and AU2 (wider) raise forehead lines; older faces have them at rest."""
    au1, au2 = a["AU1"], a["AU2"]
    fl = max(au1, au2) + 0.5 * idt.wrinkles
    if fl > 0.15:
        reach = 0.12 + 0.2 * (au2 / (au1 + au2 + 1e-6)) + 0.1 * idt.wrinkles
        colour = _mix(tones.skin, tones.deep, min(1.0, 0.5 * fl + 0.2))
        for k in range(2 if fl < 0.55 else 3):
            y = -0.44 - 0.07 * k
            line = _through((-reach, y + 0.015), (0.0, y - 0.02), (reach, y + 0.015), 7)
            cv.stroke(line, 0.006 + 0.004 * fl, colour)


def _draw_brows(cv: _Canvas, idt: Identity, a: dict, tones: _Tones, dx_eyes: float) -> None:
    """AU1 lifts the inner ends, AU2 the outer ends, AU4 lowers and knits them (with furrows between)."""
    au1, au2, au4 = a["AU1"], a["AU2"], a["AU4"]
    base_y = -0.12 - idt.brow_gap
    for s in (-1.0, 1.0):
        ex = s * idt.eye_spacing + dx_eyes
        inner_x = ex - s * (idt.eye_width * 0.95 - 0.04 * au4)
        outer_x = ex + s * idt.eye_width * 1.2
        inner_y = base_y - 0.13 * au1 + 0.08 * au4 - 0.02 * au2
        outer_y = base_y - 0.13 * au2 - 0.03 * au1 - 0.01 * au4 + 0.02 - idt.eye_tilt
        mid = (0.5 * (inner_x + outer_x), 0.5 * (inner_y + outer_y) - idt.brow_arch - 0.03 * au2 + 0.015 * au4)
        pts = _through((inner_x, inner_y), mid, (outer_x, outer_y), 9)
        taper = idt.brow_thickness * (1.0 + 0.2 * au4) * _BROW_TAPER
        cv.stroke(pts, taper, idt.brow_colour)
    if au4 > 0.1:  # vertical furrows between the knitted brows
        colour = _mix(tones.skin, tones.deep, min(1.0, 0.2 + 0.5 * au4))
        for s in (-1.0, 1.0):
            x = s * 0.05 + dx_eyes
            cv.stroke(np.array([[x, base_y + 0.04], [x - s * 0.006, base_y + 0.08], [x - s * 0.01, base_y + 0.12]]),
                      0.003 + 0.003 * au4, colour)


def _draw_eyes(cv: _Canvas, idt: Identity, a: dict, tones: _Tones, dx_eyes: float, gaze: float) -> None:
    """Both eyes: AU5 widens the opening, AU6 (cheek raiser) and AU7 (lid tightener) narrow it."""
    au5, au6, au7 = a["AU5"], a["AU6"], a["AU7"]
    up_h = idt.eye_open * (1.0 + 1.0 * au5 - 0.4 * au7 - 0.35 * au6)
    low_h = idt.eye_open * 0.6 * (1.0 + 0.3 * au5 - 0.7 * au6 - 0.6 * au7)
    up_h, low_h = max(up_h, 0.012), max(low_h, 0.006)
    for s in (-1.0, 1.0):
        ex, ey = s * idt.eye_spacing + dx_eyes, -0.12
        w = idt.eye_width
        inner = (ex - s * w, ey)
        outer = (ex + s * w, ey - idt.eye_tilt)
        upper = _through(inner, (ex, ey - up_h), outer, 9)
        lower_lid = _through(outer, (ex, ey + low_h), inner, 9)
        # lid crease and under-eye bag above/below the opening
        crease = upper + (0.0, -0.025 - 0.2 * up_h * (1.0 - 0.8 * au5))
        cv.stroke(crease[1:-1], 0.005, tones.shade)
        cv.poly(np.concatenate([upper, lower_lid]), (236, 234, 228))
        _draw_iris_and_pupil(cv, idt, ex + gaze * w * 0.4, ey + 0.005, inner, outer, upper, lower_lid)
        # lash line on the upper lid, thin line on the lower lid
        cv.stroke(upper, _LASH_TAPER, (25, 18, 16))  # thicker towards the outer corner
        cv.stroke(lower_lid, 0.005 + 0.004 * au7, _mix(tones.skin, tones.deep, 0.6))
        if au6 > 0.1:
            _draw_cheek_raise(cv, tones, au6, s, ex, ey + low_h, w, outer)
        if au7 > 0.3:  # tensed lower lid
            cv.stroke(lower_lid + (0.0, 0.02), 0.004 + 0.003 * au7, _mix(tones.skin, tones.shade, au7))


def _draw_iris_and_pupil(cv: _Canvas, idt: Identity, ix: float, iy: float, inner: tuple, outer: tuple,
                         upper: np.ndarray, lower_lid: np.ndarray) -> None:
    """Iris and pupil clipped to the opening: a circle's y clamped between the lid curves at the same x."""
    w = idt.eye_width
    iris = _ellipse(ix, iy, w * 0.48, w * 0.48, 20)
    lo_x, hi_x = min(inner[0], outer[0]), max(inner[0], outer[0])
    iris[:, 0] = np.clip(iris[:, 0], lo_x, hi_x)
    iris[:, 1] = np.clip(iris[:, 1], np.interp(iris[:, 0], *_sorted_xy(upper)),
                         np.interp(iris[:, 0], *_sorted_xy(lower_lid)))
    cv.poly(iris, idt.iris)
    pupil = _ellipse(ix, iy, w * 0.22, w * 0.22, 12)
    pupil[:, 1] = np.clip(pupil[:, 1], np.interp(pupil[:, 0], *_sorted_xy(upper)),
                          np.interp(pupil[:, 0], *_sorted_xy(lower_lid)))
    cv.poly(pupil, (15, 12, 12))


def _draw_cheek_raise(cv: _Canvas, tones: _Tones, au6: float, s: float, ex: float, lid_y: float, w: float,
                      outer: tuple) -> None:
    """AU6 on one eye (side s): the cheek bulge under the lower lid (at lid_y) and crow's feet at the outer corner."""
    colour = _mix(tones.skin, tones.deep, min(1.0, 0.25 + 0.6 * au6))
    bag = _through((ex - s * w * 0.7, lid_y + 0.03), (ex, lid_y + 0.06 - 0.02 * au6),
                   (ex + s * w * 0.9, lid_y + 0.01), 7)
    cv.stroke(bag, 0.006 + 0.004 * au6, colour)
    ox, oy = outer
    for k, dy in enumerate((-0.03, 0.0, 0.035)):
        cv.stroke(np.array([[ox + s * 0.02, oy + dy * 0.4], [ox + s * (0.07 + 0.01 * k), oy + dy]]),
                  0.004 + 0.003 * au6, colour)


def _draw_nose(cv: _Canvas, idt: Identity, a: dict, tones: _Tones, dx_nose: float) -> tuple[float, float, float]:
    """Bridge, wings and nostrils; AU9 wrinkles the bridge, lifts and flares the wings. Returns (x, y, half width)."""
    au9 = a["AU9"]
    nx, ny = dx_nose, idt.nose_y - 0.03 * au9
    nw = idt.nose_width * (1.0 + 0.18 * au9)
    cv.stroke(_through((nx - 0.04, -0.08), (nx - 0.05, 0.02), (nx - 0.055, ny - 0.03), 7), 0.006, tones.shade)
    cv.stroke(_through((nx - nw, ny - 0.02), (nx - nw * 0.9, ny + 0.035), (nx - 0.02, ny + 0.03), 7), 0.008,
              tones.deep)
    cv.stroke(_through((nx + nw, ny - 0.02), (nx + nw * 0.9, ny + 0.035), (nx + 0.02, ny + 0.03), 7), 0.008,
              tones.deep)
    for s in (-1.0, 1.0):
        cv.poly(_ellipse(nx + s * nw * 0.45, ny + 0.025, 0.028, 0.014, 12), (50, 28, 25))
    if au9 > 0.1:
        colour = _mix(tones.skin, tones.deep, min(1.0, 0.3 + 0.7 * au9))
        for k in range(3):
            y = -0.06 + 0.035 * k
            wrinkle = _through((nx - 0.05, y + 0.01), (nx, y - 0.01), (nx + 0.05, y + 0.01), 5)
            cv.stroke(wrinkle, 0.005 + 0.004 * au9, colour)
    return nx, ny, nw


def _mouth_shape(idt: Identity, a: dict, dx_nose: float, side: float) -> _Mouth:
    """AU12 raises and widens the corners (AU12_unilateral one of them, on `side`), AU15 lowers them, AU20
    stretches, AU23 tightens and thins the lips, AU25/AU26 part them, AU9 lifts the middle of the upper lip."""
    au9, au12, au15, au20, au23 = a["AU9"], a["AU12"], a["AU15"], a["AU20"], a["AU23"]
    au25, au26, au12u = a["AU25"], a["AU26"], a["AU12_unilateral"]
    mx, my = dx_nose * 0.8, idt.mouth_y
    mw = idt.mouth_width * (1.0 + 0.35 * au20 + 0.22 * au12 - 0.18 * au23 - 0.05 * au15 - 0.12 * au26)
    corner_dy = -0.10 * au12 + 0.09 * au15 + 0.02 * au20
    left_dy = right_dy = corner_dy
    left_w = right_w = mw
    if side > 0:
        right_dy -= 0.13 * au12u
        right_w += 0.05 * au12u
    else:
        left_dy -= 0.13 * au12u
        left_w += 0.05 * au12u
    L = (mx - left_w, my + left_dy)
    R = (mx + right_w, my + right_dy)
    opening = 0.05 * au25 + 0.2 * au26 + 0.03 * au9 * (1.0 - au26)
    upper_t = idt.lip_thickness * (1.0 - 0.65 * au23 - 0.3 * au20)
    lower_t = idt.lip_thickness * 1.3 * (1.0 - 0.6 * au23 - 0.3 * au20)
    # AU12 keeps the centre while corners rise (a curve)
    upper_inner_y = my - 0.15 * opening - 0.03 * au9
    lower_inner_y = my + 0.85 * opening
    # cupid's bow: two peaks and a dip on the outer upper-lip line
    top_y = upper_inner_y - upper_t
    bow = np.concatenate([
        _through(L, (mx - 0.55 * mw, top_y - 0.006), (mx - 0.25 * mw, top_y - 0.012), 7),
        [(mx, top_y)],
        _through((mx + 0.25 * mw, top_y - 0.012), (mx + 0.55 * mw, top_y - 0.006), R, 7),
    ])
    return _Mouth(mx=mx, mw=mw, left=L, right=R, upper_inner_y=upper_inner_y, lower_inner_y=lower_inner_y,
                  lower_t=lower_t, upper_in=_through(L, (mx, upper_inner_y), R, 9),
                  lower_in=_through(L, (mx, lower_inner_y), R, 9), bow=bow,
                  lower_out=_through(R, (mx, lower_inner_y + lower_t), L, 9))


def _draw_mouth_folds(cv: _Canvas, idt: Identity, a: dict, tones: _Tones, mouth: _Mouth,
                      nose: tuple[float, float, float], side: float) -> None:
    """Nasolabial folds from the nose wings past the mouth corners, deeper when smiling (AU12, AU6) or sneering
    (AU9); the dimple of a one-sided smile; AU15's lines pulling down from the corners."""
    au12, au15, au12u = a["AU12"], a["AU15"], a["AU12_unilateral"]
    nx, ny, nw = nose
    for s, corner in ((-1.0, mouth.left), (1.0, mouth.right)):
        smirk = au12u if s == side else 0.0
        strength = min(1.0, 0.15 + idt.wrinkles + 0.7 * max(au12, 0.8 * a["AU9"], 0.5 * a["AU6"], 0.8 * smirk))
        if strength >= 0.25:
            start = (nx + s * (nw + 0.02), ny - 0.01)
            end = (corner[0] + s * 0.06, corner[1] + 0.06)
            mid = (0.5 * (start[0] + end[0]) + s * 0.05, 0.5 * (start[1] + end[1]))
            cv.stroke(_through(start, mid, end, 9), 0.005 + 0.006 * strength, _mix(tones.skin, tones.deep, strength))
        if smirk > 0.2:  # the dimple that a one-sided pull digs next to the raised corner
            dimple = _through((corner[0] + s * 0.015, corner[1] - 0.03), (corner[0] + s * 0.035, corner[1]),
                              (corner[0] + s * 0.015, corner[1] + 0.03), 5)
            cv.stroke(dimple, 0.004 + 0.004 * smirk, _mix(tones.skin, tones.deep, min(1.0, 0.3 + 0.6 * smirk)))
    if au15 > 0.2:  # lines pulling down from the corners
        colour = _mix(tones.skin, tones.deep, min(1.0, 0.2 + 0.6 * au15))
        for s, corner in ((-1.0, mouth.left), (1.0, mouth.right)):
            cv.stroke(np.array([[corner[0] - s * 0.005, corner[1] + 0.02], [corner[0] + s * 0.02, corner[1] + 0.09]]),
                      0.005 + 0.004 * au15, colour)


def _draw_lips(cv: _Canvas, idt: Identity, tones: _Tones, mouth: _Mouth) -> None:
    """Lips; when parted, the mouth interior and the upper teeth; the chin shadow under the lower lip."""
    m = mouth
    cv.poly(np.concatenate([m.bow, m.lower_out]), idt.lip_colour)
    if m.lower_inner_y - m.upper_inner_y > 0.012:
        cv.poly(np.concatenate([m.upper_in, m.lower_in[::-1]]), (70, 22, 28))
        teeth_h = min(0.04, 0.6 * (m.lower_inner_y - m.upper_inner_y))
        teeth = np.concatenate([m.upper_in[1:-1], (m.upper_in[-2:0:-1] + (0.0, teeth_h))])
        teeth[:, 1] = np.minimum(teeth[:, 1], np.concatenate([m.lower_in[1:-1, 1], m.lower_in[-2:0:-1, 1]]))
        cv.poly(teeth, (232, 228, 215))
    else:
        cv.stroke(m.upper_in, 0.009, _mix(idt.lip_colour, (40, 10, 10), 0.6))
    chin_y = m.lower_inner_y + m.lower_t
    cv.stroke(_through((m.mx - 0.08, chin_y + 0.06), (m.mx, chin_y + 0.045), (m.mx + 0.08, chin_y + 0.06), 5), 0.006,
              tones.shade)


def _sorted_xy(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of a curve sorted by x, for np.interp."""
    order = np.argsort(pts[:, 0])
    return pts[order, 0], pts[order, 1]
