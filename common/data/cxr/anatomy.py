"""Geometry and drawing primitives of the procedural chest radiograph (the model is in :mod:`.phantoms`).

Everything is drawn in the **patient frame**: isotropic coordinates in units of the inner half-width of the
thorax (one unit is taken as 14 cm of an adult), ``x`` towards the patient's left (the image's right on a PA
film), ``y`` downwards from the lung apices. :class:`Frame` maps each pixel centre of a square image into that
frame (scale, in-plane rotation, shift), so every shape is defined once, free of resolution, and a radiograph of
any size shows the same patient.

Shapes are given by **margins**: approximately signed distances in units, positive inside. :func:`soft_step`
turns a margin into a coverage in [0, 1] with an edge at least one pixel wide, so edges are anti-aliased at every
image size. Lungs are described per side in the **side coordinate** ``s`` (0 at the midline, 1 at the inner chest
wall, growing laterally), so one :class:`LungShape` serves both sides.

Nothing here loops over pixels: margins are numpy expressions over the whole grid (or a window around a curve),
thin structures (vessels) are splatted as points and blurred.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

#: Physical length (cm) of one patient-frame unit (the inner half-width of an adult thorax).
CM_PER_UNIT = 14.0
#: The two sides, as the patient's; the right lung lies on the image's left.
SIDES: tuple[str, ...] = ("right", "left")


def side_sign(side: str) -> float:
    """``-1`` for the patient's right (image left, ``x < 0``), ``+1`` for the left."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    return -1.0 if side == "right" else 1.0


def soft_step(margin: np.ndarray, width: float) -> np.ndarray:
    """Coverage in [0, 1] of a shape whose margin (units, > 0 inside) is ``margin``; the edge is ``width`` wide."""
    return np.clip(0.5 + margin / width, 0.0, 1.0)


@dataclass(frozen=True)
class Frame:
    """Patient-frame coordinates of every pixel centre of a ``size`` x ``size`` image.

    The patient point ``pivot`` (x, y units) lands on the image point ``centre`` (u, v as fractions of the image
    width, v downwards); ``scale`` is image widths per unit and ``rotation_deg`` turns the patient clockwise on
    the image. ``x`` and ``y`` are (size, size) float32 arrays indexed [row, column].
    """

    size: int
    scale: float
    rotation_deg: float
    centre: tuple[float, float]
    pivot: tuple[float, float]
    x: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)

    @classmethod
    def create(
        cls, size: int, scale: float, rotation_deg: float, centre: tuple[float, float], pivot: tuple[float, float]
    ) -> Frame:
        uv = (np.arange(size, dtype=np.float64) + 0.5) / size
        du = (uv[None, :] - centre[0]) / scale
        dv = (uv[:, None] - centre[1]) / scale
        c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
        x = pivot[0] + c * du + s * dv
        y = pivot[1] - s * du + c * dv
        return cls(size, scale, rotation_deg, centre, pivot, x.astype(np.float32), y.astype(np.float32))

    @property
    def pixel(self) -> float:
        """Width of one pixel in units."""
        return 1.0 / (self.size * self.scale)

    def edge(self, width: float = 0.0) -> float:
        """An edge width (units) of at least one pixel: anti-aliasing at small sizes, ``width`` at large ones."""
        return max(width, self.pixel)

    def to_pixels(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Float (row, column) indices of patient points; pixel (0, 0) has its centre at (0.0, 0.0)."""
        c, s = math.cos(math.radians(self.rotation_deg)), math.sin(math.radians(self.rotation_deg))
        dx, dy = np.asarray(x) - self.pivot[0], np.asarray(y) - self.pivot[1]
        u = self.centre[0] + self.scale * (c * dx - s * dy)
        v = self.centre[1] + self.scale * (s * dx + c * dy)
        return v * self.size - 0.5, u * self.size - 0.5

    def window(self, x: np.ndarray, y: np.ndarray, margin: float) -> tuple[slice, slice] | None:
        """Rows and columns of the image box around patient points, grown by ``margin`` units; None if off-image."""
        rows, cols = self.to_pixels(x, y)
        pad = margin * self.size * self.scale + 1.0
        r0, r1 = max(int(math.floor(rows.min() - pad)), 0), min(int(math.ceil(rows.max() + pad)) + 1, self.size)
        c0, c1 = max(int(math.floor(cols.min() - pad)), 0), min(int(math.ceil(cols.max() + pad)) + 1, self.size)
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)


# ---------------------------------------------------------------------------------------------------------------
# Lungs, heart, mediastinum


@dataclass(frozen=True)
class LungShape:
    """Outline of one lung (the aerated space inside the ribs, before the mediastinum is cut out).

    In side coordinates ``s`` (0 midline, 1 inner chest wall) and ``y`` (units below the apex): a rounded apex
    at ``s = apex``, a lateral wall that reaches full width at ``shoulder_y``, and a diaphragmatic dome that peaks
    ``dome_height`` above ``base_y`` at ``s = dome_peak``, meets the chest wall at ``base_y`` in an acute
    costophrenic angle and falls by ``cardiophrenic_drop`` of its height towards the midline.
    """

    base_y: float
    dome_height: float
    dome_peak: float = 0.42
    cardiophrenic_drop: float = 0.55
    apex: float = 0.42
    apex_curvature: float = 1.4
    shoulder_y: float = 0.9
    medial: float = 0.04

    def dome_y(self, s: np.ndarray) -> np.ndarray:
        """y of the diaphragm surface at side coordinate ``s``."""
        lateral = np.clip((s - self.dome_peak) / (1.0 - self.dome_peak), 0.0, None)
        medial = np.clip((self.dome_peak - s) / self.dome_peak, 0.0, None)
        return self.base_y - self.dome_height * (1.0 - lateral**2 - self.cardiophrenic_drop * medial**2)

    def wall_s(self, y: np.ndarray) -> np.ndarray:
        """Side coordinate of the lateral lung edge at height ``y`` (elliptical from the apex to the shoulder)."""
        t = np.clip((self.shoulder_y - y) / self.shoulder_y, 0.0, 1.0)
        return self.apex + (1.0 - self.apex) * np.sqrt(1.0 - t**2)

    @property
    def dome_peak_y(self) -> float:
        return self.base_y - self.dome_height

    def margin(self, s: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Signed margin (units, > 0 inside) of the lung at side coordinates ``s`` and heights ``y``."""
        top = y - self.apex_curvature * (s - self.apex) ** 2
        return np.minimum(np.minimum(top, self.wall_s(y) - s), np.minimum(self.dome_y(s) - y, s - self.medial)).astype(
            np.float32
        )


@dataclass(frozen=True)
class HeartShape:
    """The cardiac silhouette: an ellipse tilted down towards the patient's left, ``tilt_deg`` from horizontal.

    ``centre`` is (x, y) in units; ``semi_major`` / ``semi_minor`` are the half axes. Its horizontal half-extent
    (:attr:`half_width`) over the thorax half-width (1 unit) is the cardiothoracic ratio.
    """

    centre: tuple[float, float]
    semi_major: float
    semi_minor: float
    tilt_deg: float

    @classmethod
    def from_ctr(
        cls, ctr: float, centre_y: float, aspect: float = 1.35, tilt_deg: float = 36.0, right_share: float = 1 / 3
    ) -> HeartShape:
        """The heart whose width is ``ctr`` of the thorax width, ``right_share`` of it right of the midline."""
        theta = math.radians(tilt_deg)
        semi_minor = ctr / math.sqrt((aspect * math.cos(theta)) ** 2 + math.sin(theta) ** 2)
        return cls((ctr * (1.0 - 2.0 * right_share), centre_y), aspect * semi_minor, semi_minor, tilt_deg)

    @property
    def half_width(self) -> float:
        """Half the horizontal extent (units): the cardiothoracic ratio, as the thorax half-width is 1."""
        theta = math.radians(self.tilt_deg)
        return math.hypot(self.semi_major * math.cos(theta), self.semi_minor * math.sin(theta))

    @property
    def half_height(self) -> float:
        """Half the vertical extent (units)."""
        theta = math.radians(self.tilt_deg)
        return math.hypot(self.semi_major * math.sin(theta), self.semi_minor * math.cos(theta))

    def extreme_points(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(x, y) of the right-most point on the patient's right (image left) and of the left-most (heart apex)."""
        theta = math.radians(self.tilt_deg)
        a, b = self.semi_major, self.semi_minor
        t = math.atan2(-b * math.sin(theta), a * math.cos(theta))
        dx = a * math.cos(theta) * math.cos(t) - b * math.sin(theta) * math.sin(t)
        dy = a * math.sin(theta) * math.cos(t) + b * math.cos(theta) * math.sin(t)
        cx, cy = self.centre
        return (cx - dx, cy - dy), (cx + dx, cy + dy)

    def margin(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        theta = math.radians(self.tilt_deg)
        dx, dy = x - self.centre[0], y - self.centre[1]
        along = dx * math.cos(theta) + dy * math.sin(theta)
        across = -dx * math.sin(theta) + dy * math.cos(theta)
        radius = np.sqrt((along / self.semi_major) ** 2 + (across / self.semi_minor) ** 2)
        return ((1.0 - radius) * self.semi_minor).astype(np.float32)


def ellipse_margin(x: np.ndarray, y: np.ndarray, centre: tuple[float, float], radii: tuple[float, float]):
    """Approximate signed margin (units) of an axis-aligned ellipse."""
    radius = np.sqrt(((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2)
    return (1.0 - radius) * min(radii)


def rounded_box_margin(x, y, centre: tuple[float, float], half_size: tuple[float, float]) -> np.ndarray:
    """Approximate signed margin (units) of a rectangle with rounded corners (a superellipse of order 4)."""
    r = ((np.abs(x - centre[0]) / half_size[0]) ** 4 + (np.abs(y - centre[1]) / half_size[1]) ** 4) ** 0.25
    return (1.0 - r) * min(half_size)


# ---------------------------------------------------------------------------------------------------------------
# Bands along curves: ribs and clavicles


def curve_band(
    s: np.ndarray, y: np.ndarray, curve_y: np.ndarray, slope: np.ndarray, half_thickness: float, edge: float
) -> np.ndarray:
    """A bony band of ``half_thickness`` units around the curve ``y = curve_y(s)``; arrays broadcast together.

    The distance to the curve is the vertical offset times the cosine of the curve's slope. The profile is that
    of a tube seen side-on, brighter at its cortical edges: about 0.65 in the middle, 1 at the edges.
    """
    distance = np.abs(y - curve_y) / np.sqrt(1.0 + slope**2)
    inside = soft_step(half_thickness - distance, edge)
    relative = np.minimum(distance / half_thickness, 1.0)
    return inside * (0.65 + 0.35 * relative**4)


# ---------------------------------------------------------------------------------------------------------------
# Curves (tubes, lines, leads)


def smooth_curve(points: np.ndarray, samples_per_segment: int = 12) -> np.ndarray:
    """Catmull-Rom spline through (N, 2) control points; returns ((N-1) * samples + 1, 2) points."""
    points = np.asarray(points, dtype=np.float64)
    padded = np.vstack([2 * points[0] - points[1], points, 2 * points[-1] - points[-2]])
    t = np.linspace(0.0, 1.0, samples_per_segment, endpoint=False)[:, None]
    pieces = []
    for i in range(len(points) - 1):  # a handful of segments, not pixels
        p0, p1, p2, p3 = padded[i : i + 4]
        pieces.append(
            0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (3 * p1 - p0 - 3 * p2 + p3) * t**3)
        )
    return np.vstack([*pieces, points[-1:]])


def polyline_distance(frame: Frame, points: np.ndarray, reach: float) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Distance (units) from the pixels near a polyline of (N, 2) patient points to the polyline.

    Only the image box within ``reach`` units of the points is computed; returns (box, distances of the box)
    or None when the polyline is off the image.
    """
    points = np.asarray(points, dtype=np.float64)
    box = frame.window(points[:, 0], points[:, 1], reach)
    if box is None:
        return None
    x, y = frame.x[box][..., None], frame.y[box][..., None]
    a, b = points[:-1], points[1:]
    d = b - a
    length2 = np.maximum((d**2).sum(axis=1), 1e-12)
    t = np.clip(((x - a[:, 0]) * d[:, 0] + (y - a[:, 1]) * d[:, 1]) / length2, 0.0, 1.0)
    dist2 = (x - a[:, 0] - t * d[:, 0]) ** 2 + (y - a[:, 1] - t * d[:, 1]) ** 2
    return box, np.sqrt(dist2.min(axis=-1)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Vessels and smooth noise


def vessel_tree(
    rng: np.random.Generator,
    hilum: tuple[float, float],
    side: str,
    num_roots: int = 7,
    levels: int = 6,
    root_length: float = 0.28,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Segments of a pulmonary vessel tree branching out of ``hilum`` (x, y units) into one lung.

    Roots fan out from pointing at the apex to pointing at the lateral base; each level forks every segment in
    two (angles 12-30 degrees either side, length x0.7-0.9, weight x0.75). Returns starts (M, 2), ends (M, 2),
    weights (M,) and branching levels (M,) with ``M = num_roots * (2**levels - 1)``.
    """
    sign = side_sign(side)
    angles = np.linspace(-1.4, 1.45, num_roots) + rng.uniform(-0.12, 0.12, num_roots)  # radians from lateral
    starts = np.tile(np.asarray(hilum, dtype=np.float64), (num_roots, 1))
    lengths = root_length * rng.uniform(0.8, 1.2, num_roots)
    weights = np.ones(num_roots)
    all_starts, all_ends, all_weights, all_levels = [], [], [], []
    for level in range(levels):
        ends = starts + np.stack([sign * np.cos(angles), np.sin(angles)], axis=1) * lengths[:, None]
        all_starts.append(starts)
        all_ends.append(ends)
        all_weights.append(weights)
        all_levels.append(np.full(len(weights), level))
        n = len(angles)
        spread = rng.uniform(0.21, 0.52, n)
        angles = np.concatenate([angles - spread, angles + spread]) + rng.normal(0.0, 0.08, 2 * n)
        starts = np.concatenate([ends, ends])
        lengths = np.concatenate([lengths, lengths]) * rng.uniform(0.72, 0.88, 2 * n)
        weights = np.concatenate([weights, weights]) * 0.75
    return np.concatenate(all_starts), np.concatenate(all_ends), np.concatenate(all_weights), np.concatenate(all_levels)


def splat_segments(frame: Frame, starts: np.ndarray, ends: np.ndarray, weights: np.ndarray, width: float) -> np.ndarray:
    """Line density image (size, size) of weighted segments, ``width`` units wide (Gaussian profile).

    Each segment is sampled every half pixel, the samples are added bilinearly into the grid and the grid is
    blurred; sample weights are set so that a line's peak value equals its weight at any image size.
    """
    size = frame.size
    step = 0.5 * frame.pixel
    lengths = np.linalg.norm(ends - starts, axis=1)
    counts = np.maximum(np.ceil(lengths / step).astype(int), 1)
    owner = np.repeat(np.arange(len(starts)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    t = (offsets + 0.5) / counts[owner]
    points = starts[owner] + (ends - starts)[owner] * t[:, None]
    rows, cols = frame.to_pixels(points[:, 0], points[:, 1])
    sigma_px = max(width / frame.pixel, 0.6)
    spacing_px = lengths[owner] / counts[owner] / frame.pixel
    sample_weight = weights[owner] * spacing_px * math.sqrt(2 * math.pi) * sigma_px  # blurred line peak = weight
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    fr, fc = rows - r0, cols - c0
    grid = np.zeros(size * size, dtype=np.float64)
    for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        r, c = r0 + dr, c0 + dc
        ok = (r >= 0) & (r < size) & (c >= 0) & (c < size)
        grid += np.bincount(r[ok] * size + c[ok], weights=(sample_weight * w)[ok], minlength=size * size)
    return ndi.gaussian_filter(grid.reshape(size, size), sigma_px).astype(np.float32)


def smooth_noise(
    frame: Frame, rng: np.random.Generator, cell: float, box: tuple[float, float, float, float]
) -> np.ndarray:
    """Smooth zero-mean, unit-variance-ish random field (size, size) fixed to the patient frame.

    Random values on a grid of ``cell`` units over ``box`` = (x0, x1, y0, y1) are interpolated with cubic
    B-splines at every pixel, so the field is the same for every image size.
    """
    x0, x1, y0, y1 = box
    nx, ny = int(math.ceil((x1 - x0) / cell)) + 4, int(math.ceil((y1 - y0) / cell)) + 4
    values = rng.normal(0.0, 1.6, (ny, nx))  # cubic B-spline smoothing shrinks the variance about 2.5x
    coords = np.stack([(frame.y - y0) / cell + 2.0, (frame.x - x0) / cell + 2.0])
    return ndi.map_coordinates(values, coords, order=3, mode="nearest", prefilter=False).astype(np.float32)
