"""Procedural scenes: a slowly panning cluttered background and small moving shapes.

Everything is numpy and deterministic from a ``numpy.random.Generator``. Background colours
are desaturated (greys, browns, olives) so the saturated object colours stay unambiguous
after H.264 compression; the clutter (blobs, bars, speckle) is textured at the scale of a
visual token so that no token is trivially "empty".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 200, 50),
    "blue": (40, 70, 245),
    "yellow": (245, 225, 30),
}
"""Object colours that questions ask about (saturated, far apart in hue)."""

SHAPES = ("circle", "square", "triangle", "cross")
"""Object shapes that questions ask about."""


@dataclass
class SceneObject:
    """One object: shape, colour(s), a straight-line trajectory and a visibility window.

    Attributes:
        shape: one of :data:`SHAPES`.
        color: colour name (:data:`COLORS`) while visible (before ``change_at``).
        start, end: visible in frames ``start <= t < end``.
        x, y: top-left corner at frame ``start`` (pixels, float).
        vx, vy: pixels per frame.
        size: side of the bounding square, pixels.
        hop: the position is updated every ``hop`` frames (at ``start``, ``start + hop``, …):
            ``hop = 2`` with ``vx = 14`` moves one 28-pixel token cell per temporal group.
        dx, dy: drift in pixels per frame *within* a hop (frame ``start + k * hop + j`` is
            shifted by ``j * (dx, dy)``): with ``hop = 2`` the two frames of a temporal group
            differ, so one visual token (a 2-frame tubelet) shows which way the object moves.
        change_at, new_color: from frame ``change_at`` on the object is ``new_color``.
    """

    shape: str
    color: str
    start: int
    end: int
    x: float
    y: float
    vx: float = 0.0
    vy: float = 0.0
    size: int = 18
    change_at: int | None = None
    new_color: str | None = None
    role: str = "distractor"
    hop: int = 1
    dx: float = 0.0
    dy: float = 0.0

    def visible(self, t: int) -> bool:
        return self.start <= t < self.end

    def color_at(self, t: int) -> str:
        return self.new_color if self.change_at is not None and t >= self.change_at else self.color

    def box(self, t: int) -> list[int]:
        """Integer bounding box ``[x0, y0, x1, y1)`` at frame ``t``."""
        dt = (t - self.start) // self.hop * self.hop
        within = (t - self.start) % self.hop
        x = int(round(self.x + self.vx * dt + self.dx * within))
        y = int(round(self.y + self.vy * dt + self.dy * within))
        return [x, y, x + self.size, y + self.size]


@dataclass
class Scene:
    """A clip's background plus its objects."""

    frames: int
    height: int
    width: int
    background: np.ndarray  # uint8 [Hb, Wb, 3], larger than the frame (it pans)
    pan: tuple[float, float]  # pixels per frame (dx, dy)
    objects: list[SceneObject] = field(default_factory=list)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: int) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    gh, gw = h // scale + 2, w // scale + 2
    grid = rng.random((gh, gw))
    ys = np.arange(h) / scale
    xs = np.arange(w) / scale
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a = grid[y0][:, x0]
    b = grid[y0][:, x0 + 1]
    c = grid[y0 + 1][:, x0]
    d = grid[y0 + 1][:, x0 + 1]
    return a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx


def make_background(rng: np.random.Generator, height: int, width: int, clutter: int = 14) -> np.ndarray:
    """A desaturated, textured background with ``clutter`` blobs and bars, ``uint8 [height, width, 3]``."""
    base = rng.uniform(70, 150) + rng.uniform(-20, 20, size=3)  # a tinted grey: low saturation
    tint = base + rng.uniform(-15, 15, size=3)
    n1 = _smooth_noise(rng, height, width, 24)[..., None]
    n2 = _smooth_noise(rng, height, width, 6)[..., None]
    img = base * (0.75 + 0.35 * n1) + (tint - base) * n2 + rng.normal(0, 6, size=(height, width, 3))
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(clutter):
        grey = rng.uniform(40, 200)
        col = np.clip(grey + rng.uniform(-20, 20, size=3), 0, 255)  # low saturation: never an object colour
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        if rng.random() < 0.5:  # blob
            r = rng.uniform(4, 14)
            mask = (xx - cx) ** 2 / rng.uniform(0.5, 2.0) + (yy - cy) ** 2 <= r * r
        else:  # bar
            ang = rng.uniform(0, np.pi)
            length, thick = rng.uniform(10, 40), rng.uniform(1.5, 4)
            dx, dy = xx - cx, yy - cy
            along = dx * np.cos(ang) + dy * np.sin(ang)
            across = -dx * np.sin(ang) + dy * np.cos(ang)
            mask = (np.abs(along) <= length / 2) & (np.abs(across) <= thick)
        img[mask] = 0.6 * col + 0.4 * img[mask]
    return np.clip(img, 0, 255).astype(np.uint8)


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean ``[size, size]`` mask of a shape filling its bounding square."""
    c = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    dx, dy = xx - c, yy - c
    r = size / 2
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r * 0.8) & (np.abs(dy) <= r * 0.8)
    if shape == "triangle":  # apex up
        frac = (yy + 0.5) / size  # 0 at top, 1 at bottom
        return np.abs(dx) <= frac * r
    if shape == "cross":
        arm = r * 0.36
        return ((np.abs(dx) <= arm) | (np.abs(dy) <= arm)) & (np.abs(dx) <= r) & (np.abs(dy) <= r)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene) -> np.ndarray:
    """The clip as ``uint8 [T, H, W, 3]``: the panned background with objects painted on top."""
    t_n, h, w = scene.frames, scene.height, scene.width
    out = np.empty((t_n, h, w, 3), dtype=np.uint8)
    bh, bw = scene.background.shape[:2]
    masks = {}
    for t in range(t_n):
        ox = int(round((bw - w) / 2 + scene.pan[0] * (t - t_n / 2)))
        oy = int(round((bh - h) / 2 + scene.pan[1] * (t - t_n / 2)))
        ox, oy = min(max(ox, 0), bw - w), min(max(oy, 0), bh - h)
        frame = scene.background[oy : oy + h, ox : ox + w].copy()
        for obj in scene.objects:
            if not obj.visible(t):
                continue
            key = (obj.shape, obj.size)
            if key not in masks:
                masks[key] = shape_mask(obj.shape, obj.size)
            x0, y0, x1, y1 = obj.box(t)
            m = masks[key]
            frame[y0:y1, x0:x1][m] = COLORS[obj.color_at(t)]
        out[t] = frame
    return out
