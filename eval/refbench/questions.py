"""Question types: each builds a scene whose answer depends on a small part of the clip.

Every builder takes a ``numpy.random.Generator``, the clip geometry and the answer index it
must produce (so answers are balanced), and returns a :class:`Built` — the question, its
four options, the objects to render and the **evidence** (``{"frame", "box"}`` items: the
frames and pixel boxes that determine the answer).

Options are listed in the question text as ``(A) … (B) … (C) … (D) …`` and the answer is a
single letter. The option list of a type is fixed (colours, shapes, directions, counts, in
one canonical order), so a small model trained from scratch learns the mapping from what it
sees to a letter instead of having to read and match option strings; which object the
question is about, and when it is visible, varies per sample.

Events are aligned to temporal-patch boundaries (even frames), so an object visible in a
temporal group is visible in both of its frames. With ``Geometry.aligned`` (the default)
objects are also aligned to the backbone's merged-token grid: each sits inside one 28×28
cell (2×2 patches of 14 px), so an object in one temporal group is exactly **one visual
token**, and moving objects hop one cell per temporal group while drifting inside their cell
between the group's two frames (a 2-frame tubelet then shows the motion). Measured reason: with free
placement (objects straddling patch borders at arbitrary offsets) a from-scratch
Qwen2.5-VL vision tower of the teacher's size stayed at chance on shape after 12k clips,
while grid-aligned objects reach 58% after 1.6k clips (linear probe on the merger output).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tokensieve.eval.refbench.scene import COLORS, SHAPES, SceneObject

LETTERS = ("A", "B", "C", "D")
COLOR_NAMES = tuple(COLORS)
DIRECTIONS = ("left", "right", "up", "down")
UNIT = {None: (0, 0), "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
"""Direction → unit step (x, y) in image coordinates (y down)."""
COUNTS = ("one", "two", "three", "four")


@dataclass
class Geometry:
    frames: int = 16
    height: int = 112
    width: int = 112
    temporal: int = 2
    min_size: int = 22
    max_size: int = 26
    aligned: bool = True  # objects inside one token cell, motion in whole cells per temporal group
    cell: int = 28  # merged-token cell, pixels (patch 14 × merge 2)

    @property
    def groups(self) -> int:
        return self.frames // self.temporal


@dataclass
class Built:
    question: str
    options: list[str]
    answer: int
    objects: list[SceneObject]
    evidence: list[dict]


class Retry(Exception):
    """The random draw could not satisfy the type's constraints; draw again."""


def format_question(text: str, options: list[str]) -> str:
    return text + " " + " ".join(f"({letter}) {opt}" for letter, opt in zip(LETTERS, options))


def _overlaps(a: list[int], b: list[int], margin: int = 2) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _fits(obj: SceneObject, geo: Geometry) -> bool:
    for t in (obj.start, obj.end - 1):
        x0, y0, x1, y1 = obj.box(t)
        if x0 < 0 or y0 < 0 or x1 > geo.width or y1 > geo.height:
            return False
    return True


def _clashes(obj: SceneObject, others: list[SceneObject]) -> bool:
    """True if ``obj`` overlaps another object in any frame both are visible in."""
    for other in others:
        for t in range(max(obj.start, other.start), min(obj.end, other.end)):
            if _overlaps(obj.box(t), other.box(t)):
                return True
    return False


def _place(rng: np.random.Generator, geo: Geometry, others: list[SceneObject], tries: int = 60, speed: tuple[float, float] = (0.0, 0.0), direction: str | None = None, **kw) -> SceneObject:
    """An object at a random position (and velocity) that stays in frame and overlaps nothing.

    With ``geo.aligned`` the object is centred in a random token cell; it is static unless a
    ``direction`` is given, then it hops one cell per temporal group that way and drifts inside
    its cell between the group's frames (see :func:`_place_aligned`).

    Raises:
        Retry: no position found in ``tries`` draws."""
    size = kw.pop("size", None)
    if geo.aligned:
        return _place_aligned(rng, geo, others, tries, direction, size, **kw)
    for _ in range(tries):
        s = int(size or rng.integers(geo.min_size, geo.max_size + 1))
        v = rng.uniform(*speed)
        if direction is None:
            ang = rng.uniform(0, 2 * np.pi)
            vx, vy = v * np.cos(ang), v * np.sin(ang)
        else:
            ux, uy = UNIT[direction]
            vx, vy = ux * v + rng.uniform(-0.4, 0.4), uy * v + rng.uniform(-0.4, 0.4)
        obj = SceneObject(x=float(rng.uniform(0, geo.width - s)), y=float(rng.uniform(0, geo.height - s)), vx=vx, vy=vy, size=s, **kw)
        if _fits(obj, geo) and not _clashes(obj, others):
            return obj
    raise Retry("no room")


def _place_aligned(rng: np.random.Generator, geo: Geometry, others: list[SceneObject], tries: int, direction: str | None, size, **kw) -> SceneObject:
    """An object inside one ``geo.cell`` token cell (centred when static). A mover hops one
    cell per temporal group and, between the frames of a group, drifts from the trailing side
    of its cell to the leading side (2 px margins: ``cell - size - 4`` px, at least 6, so its
    size is capped at ``cell - 10``), so each of its tokens shows the motion on its own."""
    cols, rows = geo.width // geo.cell, geo.height // geo.cell
    step = geo.cell / geo.temporal  # pixels per frame: one cell per temporal group
    ux, uy = UNIT[direction]
    for _ in range(tries):
        s = int(size or rng.integers(geo.min_size, geo.max_size + 1))
        s = min(s, geo.cell - (10 if direction is not None else 2))
        off = (geo.cell - s) // 2
        cx, cy = int(rng.integers(cols)), int(rng.integers(rows))
        drift = (geo.cell - s - 4) / max(1, geo.temporal - 1) if direction is not None else 0.0
        ox = off if ux == 0 else (2 if ux > 0 else geo.cell - s - 2)
        oy = off if uy == 0 else (2 if uy > 0 else geo.cell - s - 2)
        obj = SceneObject(x=float(cx * geo.cell + ox), y=float(cy * geo.cell + oy), vx=ux * step, vy=uy * step, size=s, hop=geo.temporal, dx=ux * drift, dy=uy * drift, **kw)
        if _fits(obj, geo) and not _clashes(obj, others):
            return obj
    raise Retry("no room")


def _brief_window(rng: np.random.Generator, geo: Geometry, groups: int) -> tuple[int, int]:
    g = int(rng.integers(0, geo.groups - groups + 1))
    return g * geo.temporal, (g + groups) * geo.temporal


def _distractors(rng, geo: Geometry, objects: list[SceneObject], n: int, shapes, colors, persistent: bool = True, window=None) -> None:
    """Add ``n`` distractors drawn from ``shapes`` × ``colors``; half persistent and slowly moving."""
    for _ in range(n):
        shape = str(rng.choice(shapes))
        color = str(rng.choice(colors))
        if persistent and rng.random() < 0.5:
            start, end = 0, geo.frames
            speed = (0.3, 1.5)
        else:
            lo, hi = window or (0, geo.frames)
            g0, g1 = lo // geo.temporal, hi // geo.temporal
            glen = int(rng.integers(1, 3))
            if g1 - g0 < glen:
                glen = g1 - g0
            g = int(rng.integers(g0, g1 - glen + 1))
            start, end = g * geo.temporal, (g + glen) * geo.temporal
            speed = (0.0, 1.0)
        objects.append(_place(rng, geo, objects, shape=shape, color=color, start=start, end=end, speed=speed))


def _evidence(obj: SceneObject, frames) -> list[dict]:
    return [{"frame": int(t), "box": obj.box(int(t))} for t in frames]


# --------------------------------------------------------------------------- types
def q_color(rng, geo: Geometry, answer: int) -> Built:
    """Attribute: the colour of the one object of a given shape, visible only briefly."""
    shape = str(rng.choice(SHAPES))
    start, end = _brief_window(rng, geo, int(rng.integers(1, 3)))
    target = _place(rng, geo, [], shape=shape, color=COLOR_NAMES[answer], start=start, end=end, speed=(0.0, 1.0), role="target")
    objects = [target]
    _distractors(rng, geo, objects, int(rng.integers(1, 4)), [s for s in SHAPES if s != shape], COLOR_NAMES)
    q = format_question(f"What colour is the {shape}?", list(COLOR_NAMES))
    return Built(q, list(COLOR_NAMES), answer, objects, _evidence(target, range(start, end)))


def q_shape(rng, geo: Geometry, answer: int) -> Built:
    """Attribute: the shape of the one object of a given colour, visible only briefly."""
    color = str(rng.choice(COLOR_NAMES))
    start, end = _brief_window(rng, geo, int(rng.integers(1, 3)))
    target = _place(rng, geo, [], shape=SHAPES[answer], color=color, start=start, end=end, speed=(0.0, 1.0), role="target")
    objects = [target]
    _distractors(rng, geo, objects, int(rng.integers(1, 4)), SHAPES, [c for c in COLOR_NAMES if c != color])
    q = format_question(f"What shape is the {color} object?", list(SHAPES))
    return Built(q, list(SHAPES), answer, objects, _evidence(target, range(start, end)))


def q_direction(rng, geo: Geometry, answer: int) -> Built:
    """Direction of motion of the one object of a given colour over 3–4 temporal groups (aligned
    geometry: a 16–18 px object hops 2–3 token cells and drifts 6–8 px inside its cell between
    the two frames of each temporal group; free placement: 36–52 px); evidence: its first and
    last temporal group."""
    color = str(rng.choice(COLOR_NAMES))
    groups = int(rng.integers(3, 5))
    start, end = _brief_window(rng, geo, groups)
    span = end - 1 - start
    target = _place(rng, geo, [], shape=str(rng.choice(SHAPES)), color=color, start=start, end=end, speed=(36 / span, 52 / span), direction=DIRECTIONS[answer], size=int(rng.integers(16, 19) if geo.aligned else rng.integers(geo.min_size, geo.min_size + 3)), role="target")
    objects = [target]
    _distractors(rng, geo, objects, int(rng.integers(1, 3)), SHAPES, [c for c in COLOR_NAMES if c != color])
    t = geo.temporal
    q = format_question(f"Which way does the {color} object move?", list(DIRECTIONS))
    return Built(q, list(DIRECTIONS), answer, objects, _evidence(target, [*range(start, start + t), *range(end - t, end)]))


def q_count(rng, geo: Geometry, answer: int) -> Built:
    """Counting: how many objects of a colour flash up (each for one temporal group)."""
    color = str(rng.choice(COLOR_NAMES))
    n = answer + 1
    objects: list[SceneObject] = []
    evidence: list[dict] = []
    for _ in range(n):
        start, end = _brief_window(rng, geo, 1)
        obj = _place(rng, geo, objects, shape=str(rng.choice(SHAPES)), color=color, start=start, end=end, speed=(0.0, 0.5), size=int(rng.integers(geo.min_size - 2, geo.min_size + 1)), role="target")
        objects.append(obj)
        evidence += _evidence(obj, range(start, end))
    _distractors(rng, geo, objects, int(rng.integers(1, 3)), SHAPES, [c for c in COLOR_NAMES if c != color])
    q = format_question(f"How many {color} objects appear?", list(COUNTS))
    return Built(q, list(COUNTS), answer, objects, evidence)


def q_present(rng, geo: Geometry, answer: int) -> Built:
    """Presence at a time: the shape shown at the beginning (first 4 frames) or at the end (last 4)."""
    at_end = bool(rng.random() < 0.5)
    two = 2 * geo.temporal
    start, end = (geo.frames - two, geo.frames) if at_end else (0, two)
    target = _place(rng, geo, [], shape=SHAPES[answer], color=str(rng.choice(COLOR_NAMES)), start=start, end=end, speed=(0.0, 1.0), role="target")
    objects = [target]
    _distractors(rng, geo, objects, int(rng.integers(1, 4)), SHAPES, COLOR_NAMES, persistent=False, window=(two, geo.frames - two))
    q = format_question(f"Which shape is shown at the {'end' if at_end else 'beginning'}?", list(SHAPES))
    return Built(q, list(SHAPES), answer, objects, _evidence(target, range(start, end)))


def q_order(rng, geo: Geometry, answer: int) -> Built:
    """Temporal order: which of three colours flashes up first (one temporal group each, distinct groups)."""
    others = [c for c in COLOR_NAMES if c != COLOR_NAMES[answer]]
    colors = [COLOR_NAMES[answer], *rng.choice(others, size=2, replace=False).tolist()]
    groups = np.sort(rng.choice(geo.groups, size=3, replace=False))
    objects: list[SceneObject] = []
    evidence: list[dict] = []
    for color, g in zip(colors, groups):  # the answer colour takes the earliest group
        start, end = int(g) * geo.temporal, (int(g) + 1) * geo.temporal
        obj = _place(rng, geo, objects, shape=str(rng.choice(SHAPES)), color=str(color), start=start, end=end, speed=(0.0, 0.5), role="target")
        objects.append(obj)
        evidence += _evidence(obj, range(start, end))
    q = format_question("Which colour appears first?", list(COLOR_NAMES))
    return Built(q, list(COLOR_NAMES), answer, objects, evidence)


def q_change(rng, geo: Geometry, answer: int) -> Built:
    """Event: the one object of a shape changes colour; which colour does it turn? Evidence: after the change."""
    shape = str(rng.choice(SHAPES))
    before = str(rng.choice([c for c in COLOR_NAMES if c != COLOR_NAMES[answer]]))
    start, end = _brief_window(rng, geo, int(rng.integers(3, 5)))
    t = geo.temporal
    change_at = int(rng.integers(start // t + 1, end // t)) * t
    change_at = max(change_at, end - 2 * t)  # at most two groups after the change
    target = _place(rng, geo, [], shape=shape, color=before, new_color=COLOR_NAMES[answer], change_at=change_at, start=start, end=end, speed=(0.0, 1.0), role="target")
    objects = [target]
    _distractors(rng, geo, objects, int(rng.integers(1, 3)), [s for s in SHAPES if s != shape], COLOR_NAMES)
    q = format_question(f"What colour does the {shape} turn into?", list(COLOR_NAMES))
    return Built(q, list(COLOR_NAMES), answer, objects, _evidence(target, range(change_at, end)))


def question_words(samples_per_type: int = 24, seed: int = 0) -> tuple[str, ...]:
    """Every word of the question texts (with its leading space when it follows one, as a
    byte-level BPE vocabulary holds it: ``" circle"``), sorted; single letters left out.

    Read from ``samples_per_type`` draws of each type (all four answers each) plus the option
    lists, so it follows the templates without restating them. A teacher's tokenizer makes
    these single tokens (``tokensieve.models.backbones.tiny.word_merges``), as a trained
    vocabulary would."""
    import re

    geo = Geometry()
    texts = [" " + " ".join(opts) for opts in (COLOR_NAMES, SHAPES, DIRECTIONS, COUNTS)]
    for k, (name, builder) in enumerate(QUESTION_TYPES.items()):
        rng = np.random.default_rng([seed, k])
        for i in range(samples_per_type):
            try:
                texts.append(builder(rng, geo, i % len(LETTERS)).question)
            except Retry:
                continue
    return tuple(sorted({w for text in texts for w in re.findall(r" ?[A-Za-z]+", text) if len(w.strip()) > 1}))


QUESTION_TYPES: dict[str, Callable[..., Built]] = {
    "color": q_color,
    "shape": q_shape,
    "direction": q_direction,
    "count": q_count,
    "present": q_present,
    "order": q_order,
    "change": q_change,
}
"""Type name → builder. The generator cycles through the types it is given, in this order."""
