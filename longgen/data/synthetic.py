"""Synthetic long-video world with known ground truth: coloured shapes bouncing in a box.

A world is a fixed set of objects, each with a fixed shape, colour and size, moving at constant velocity
and bouncing elastically off the frame borders. Everything is a pure function of the world spec, so a
clip of any length can be rendered exactly, and a generated clip can be scored against the truth with
no learned model (``longgen.eval.synthetic_score``). The structure is long-range on purpose: the object
count, colours, sizes and speeds never change, so any drift in a long generated clip is an error.

Coordinates are resolution independent: an object's ``size`` is its radius (half side for squares) as a
fraction of ``min(height, width)``, and its position and velocity live in its travel range, [0, 1] per
axis, which maps to centre pixels ``[r, dim - r]`` (continuous pixel coordinates: the image spans
``[0, width] x [0, height]`` and pixel ``(i, j)`` has its centre at ``(j + 0.5, i + 0.5)``). Bounces are
exact: the unbounded path is folded into [0, 1] (a triangle wave), so nothing accumulates over time.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 60, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 210, 220),
    "white": (235, 235, 235),
}
"""Object colours, at least 150 RGB units from each other and from the background."""

BACKGROUND: tuple[int, int, int] = (30, 30, 30)
BACKGROUND_NAME = "dark grey"
SHAPES = ("circle", "square")
CAPTION_STYLES = ("full", "short", "position")
DEFAULT_SIZE_RANGE: tuple[float, float] = (0.07, 0.12)
"""Object radius range (fraction of the short side) of :func:`sample_world` and ``data.synthetic.size_range``."""
DEFAULT_NUM_OBJECTS: tuple[int, int] = (2, 3)
"""Objects per world (inclusive range) of :func:`sample_world` and ``data.synthetic.num_objects``."""
DEFAULT_COLORS: tuple[str, ...] = tuple(sorted(PALETTE))
"""The palette colours a world's objects are drawn from (:func:`sample_world`, ``data.synthetic.colors``)."""
RENDER_CHUNK = 64


@dataclass(frozen=True)
class ShapeSpec:
    """One object: shape, palette colour name, size and start state (see the module docstring)."""

    shape: str
    color: str
    size: float
    position: tuple[float, float]
    velocity: tuple[float, float]

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose from {SHAPES}")
        if self.color not in PALETTE:
            raise ValueError(f"unknown colour {self.color!r}; choose from {sorted(PALETTE)}")
        if not 0.0 < self.size < 0.5:
            raise ValueError(f"size is a fraction of the short side in (0, 0.5), got {self.size}")
        object.__setattr__(self, "position", tuple(float(v) for v in self.position))
        object.__setattr__(self, "velocity", tuple(float(v) for v in self.velocity))

    @property
    def rgb(self) -> tuple[int, int, int]:
        return PALETTE[self.color]

    def radius_px(self, height: int, width: int) -> float:
        """Radius (circle) or half side (square) in pixels at this resolution."""
        return self.size * min(height, width)

    def area_px(self, height: int, width: int) -> float:
        """Area in pixels of the un-occluded object at this resolution."""
        r = self.radius_px(height, width)
        return math.pi * r * r if self.shape == "circle" else 4.0 * r * r

    def speed_px(self, height: int, width: int) -> float:
        """Speed in pixels per frame (constant: bounces only flip the sign of a component)."""
        r = self.radius_px(height, width)
        return math.hypot(self.velocity[0] * (width - 2 * r), self.velocity[1] * (height - 2 * r))

    def size_word(self) -> str:
        return "small" if self.size < 0.085 else ("medium" if self.size < 0.105 else "large")

    def place_words(self) -> str:
        """Where the object is at frame 0, by thirds of its travel range: ``top left``, ``top``, ``middle``,
        ``bottom right``, ... (image rows grow downwards)."""
        x, y = self.position
        col = "left" if x < 1 / 3 else ("right" if x > 2 / 3 else "")
        row = "top" if y < 1 / 3 else ("bottom" if y > 2 / 3 else "")
        return " ".join(w for w in (row, col) if w) or "middle"

    def heading_words(self) -> str:
        """Where the object heads at frame 0, one of 8 directions: ``up``, ``down right``, ``left``, ..."""
        angle = math.degrees(math.atan2(-self.velocity[1], self.velocity[0])) % 360.0  # counter-clockwise, up > 0
        sector = int(((angle + 22.5) % 360.0) // 45.0)
        return ("right", "up right", "up", "up left", "left", "down left", "down", "down right")[sector]


@dataclass(frozen=True)
class WorldSpec:
    """A synthetic world: the objects (drawn in this order, later ones on top) and the background."""

    shapes: tuple[ShapeSpec, ...]
    background: tuple[int, int, int] = field(default=BACKGROUND)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", tuple(self.shapes))
        object.__setattr__(self, "background", tuple(int(v) for v in self.background))
        colors = [s.color for s in self.shapes]
        if len(set(colors)) != len(colors):
            raise ValueError(f"objects are identified by colour, so colours must differ; got {colors}")
        if not self.shapes:
            raise ValueError("a world needs at least one object")

    def to_dict(self) -> dict:
        return {"shapes": [asdict(s) for s in self.shapes], "background": list(self.background)}

    @classmethod
    def from_dict(cls, data: dict) -> WorldSpec:
        unknown = set(data) - {"shapes", "background"}
        if unknown:
            raise ValueError(f"unknown world keys {sorted(unknown)}; expected 'shapes' and 'background'")
        shapes = tuple(ShapeSpec(**s) for s in data["shapes"])
        return cls(shapes, tuple(data.get("background", BACKGROUND)))

    def caption(self, style: str = "full") -> str:
        """A caption naming every object's size, colour, shape and speed. ``style="full"`` is a sentence
        (``2 shapes on a dark grey background: a medium green circle moving quickly and ... bounces off the
        edges.``); ``"short"`` keeps only the words that differ between worlds (``2 shapes: medium green circle
        quickly and small blue square slowly``), so that a small text encoder's tokens are mostly the world's;
        ``"position"`` is ``short`` plus where each object is and heads at frame 0 (``2 shapes: medium green circle
        at top left moving down right quickly and ...``), for models that can tie a colour to a place before
        anything in the frame says which object is which (the demo's Wan transformer reads these words but has no
        absolute position signal to draw them by: benchmarks/RESULTS.md, "Fifth ablation"). Only the first frame
        is described: use it for videos that are one training window long."""
        if style not in CAPTION_STYLES:
            raise ValueError(f"unknown caption style {style!r}; choose from {CAPTION_STYLES}")
        parts = []
        for s in self.shapes:
            speed = math.hypot(*s.velocity)
            pace = "slowly" if speed < 0.02 else "quickly"
            if style == "short":
                parts.append(f"{s.size_word()} {s.color} {s.shape} {pace}")
            elif style == "position":
                parts.append(
                    f"{s.size_word()} {s.color} {s.shape} at {s.place_words()} moving {s.heading_words()} {pace}"
                )
            else:
                parts.append(f"a {s.size_word()} {s.color} {s.shape} moving {pace}")
        if style in ("short", "position"):
            return f"{len(parts)} {'shape' if len(parts) == 1 else 'shapes'}: " + " and ".join(parts)
        listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        noun = "shape" if len(parts) == 1 else "shapes"
        bg = BACKGROUND_NAME if self.background == BACKGROUND else "plain"
        return (
            f"{len(parts)} {noun} on a {bg} background: {listed}. Each moves in a straight line at "
            "constant speed and bounces off the edges."
        )


def _overlap_fraction(world: WorldSpec, num_frames: int = 128, side: int = 64) -> float:
    """Share of the first ``num_frames`` frames (at ``side`` x ``side``) in which two objects overlap
    (bounding circles, half diagonal for squares)."""
    centres = trajectories(world, num_frames, side, side)  # (N, K, 2)
    reach = np.array(
        [s.radius_px(side, side) * (math.sqrt(2.0) if s.shape == "square" else 1.0) for s in world.shapes]
    )
    gaps = np.linalg.norm(centres[:, :, None] - centres[:, None, :], axis=-1)  # (N, K, K)
    touching = gaps < reach[:, None] + reach[None, :]
    touching &= ~np.eye(len(world.shapes), dtype=bool)[None]
    return float(touching.any(axis=(1, 2)).mean())


def sample_world(
    seed: int,
    *,
    num_objects: int | tuple[int, int] = DEFAULT_NUM_OBJECTS,
    size_range: tuple[float, float] = DEFAULT_SIZE_RANGE,
    speed_range: tuple[float, float] = (0.01, 0.04),
    max_overlap: float = 0.15,
    max_tries: int = 64,
    colors: tuple[str, ...] | list[str] = DEFAULT_COLORS,
) -> WorldSpec:
    """A random world, deterministic in ``seed``: ``num_objects`` (or a random count in an inclusive
    range) of distinct colours, sizes in ``size_range`` and speeds in ``speed_range`` (travel-range
    fractions per frame), biggest first so small objects are never hidden. The colours are drawn from
    ``colors`` (palette names; the whole palette by default).

    Worlds whose objects overlap in more than ``max_overlap`` of their first 128 frames are drawn again
    (up to ``max_tries`` times, keeping the least overlapping), so occlusion stays the exception and a
    scorer can see every object most of the time.
    """
    colors = tuple(colors)
    unknown = sorted(set(colors) - set(PALETTE))
    if unknown or len(set(colors)) != len(colors) or not colors:
        raise ValueError(f"colors must be distinct palette colours {sorted(PALETTE)}, got {list(colors)}")
    rng = np.random.default_rng(seed)
    if isinstance(num_objects, int):
        count = num_objects
    else:
        count = int(rng.integers(num_objects[0], num_objects[1] + 1))
    if not 1 <= count <= len(colors):
        raise ValueError(f"num_objects must be in [1, {len(colors)}] (one colour each of {list(colors)}), got {count}")
    best: tuple[float, WorldSpec] | None = None
    for _ in range(max(1, max_tries)):
        chosen = rng.choice(sorted(colors), size=count, replace=False)
        shapes = []
        for color in chosen:
            angle = rng.uniform(0.0, 2.0 * math.pi)
            speed = rng.uniform(*speed_range)
            shapes.append(
                ShapeSpec(
                    shape=str(rng.choice(SHAPES)),
                    color=str(color),
                    size=float(rng.uniform(*size_range)),
                    position=(float(rng.uniform()), float(rng.uniform())),
                    velocity=(speed * math.cos(angle), speed * math.sin(angle)),
                )
            )
        shapes.sort(key=lambda s: -s.size)
        world = WorldSpec(tuple(shapes))
        overlap = _overlap_fraction(world)
        if best is None or overlap < best[0]:
            best = (overlap, world)
        if overlap <= max_overlap:
            break
    return best[1]


def _fold(z: np.ndarray) -> np.ndarray:
    """Reflect an unbounded coordinate into [0, 1] (elastic bounces at 0 and 1)."""
    z = np.mod(z, 2.0)
    return np.where(z > 1.0, 2.0 - z, z)


def trajectories(
    spec: WorldSpec, num_frames: int, height: int, width: int, *, first_frame: int = 0
) -> np.ndarray:
    """Ground-truth object centres ``[num_frames, num_objects, 2]`` as (x, y) continuous pixel coordinates,
    for frames ``first_frame .. first_frame + num_frames - 1`` of the world's unending clip."""
    t = np.arange(first_frame, first_frame + num_frames, dtype=np.float64)[:, None]  # (N, 1)
    out = np.zeros((num_frames, len(spec.shapes), 2))
    for k, s in enumerate(spec.shapes):
        r = s.radius_px(height, width)
        for axis, dim in ((0, width), (1, height)):
            u = _fold(s.position[axis] + s.velocity[axis] * t[:, 0])
            out[:, k, axis] = r + u * (dim - 2.0 * r)
    return out


SUPERSAMPLE = 4
"""Sub-samples per pixel side used to anti-alias the shapes' edges."""


def _coverage(spec: ShapeSpec, cx: float, cy: float, height: int, width: int) -> tuple[int, int, np.ndarray]:
    """Anti-aliased coverage of one object: top-left corner ``(y0, x0)`` of its bounding box and the
    fraction of each pixel it covers, ``[h_box, w_box]`` in [0, 1], from ``SUPERSAMPLE**2`` sub-samples."""
    r = spec.radius_px(height, width)
    x0, x1 = max(0, math.floor(cx - r) - 1), min(width, math.ceil(cx + r) + 1)
    y0, y1 = max(0, math.floor(cy - r) - 1), min(height, math.ceil(cy + r) + 1)
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    xs = (np.arange(x0, x1)[:, None] + offsets[None]).reshape(-1)  # (w_box * S,) sub-sample centres
    ys = (np.arange(y0, y1)[:, None] + offsets[None]).reshape(-1)  # (h_box * S,)
    if spec.shape == "circle":
        inside = (xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2 <= r * r
    else:
        inside = (np.abs(xs[None, :] - cx) <= r) & (np.abs(ys[:, None] - cy) <= r)
    # (h_box * S, w_box * S) -> (h_box, S, w_box, S) -> mean over the sub-samples of each pixel
    alpha = inside.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
    return y0, x0, alpha


def render_clip(
    spec: WorldSpec, num_frames: int, height: int, width: int, *, first_frame: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Render a world: frames ``[num_frames, height, width, 3]`` uint8 and the centres
    ``[num_frames, num_objects, 2]`` (x, y) they were drawn at (see :func:`trajectories`). A window of a
    longer clip starts at ``first_frame`` and equals that slice of the longer clip exactly.

    Objects are composited in order with anti-aliased edges (coverage from 4x4 sub-samples per pixel),
    so a pixel on an edge mixes the object's colour and what lies beneath by the covered fraction.
    """
    if num_frames < 1 or height < 8 or width < 8:
        raise ValueError(
            f"need num_frames >= 1 and a frame of at least 8x8, got {num_frames}, {height}x{width}"
        )
    centres = trajectories(spec, num_frames, height, width, first_frame=first_frame)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    background = np.asarray(spec.background, dtype=np.float64)
    for t in range(num_frames):
        canvas = np.empty((height, width, 3))
        canvas[:] = background
        for k, s in enumerate(spec.shapes):
            y0, x0, alpha = _coverage(s, centres[t, k, 0], centres[t, k, 1], height, width)
            box = canvas[y0 : y0 + alpha.shape[0], x0 : x0 + alpha.shape[1]]
            box += alpha[..., None] * (np.asarray(s.rgb, dtype=np.float64) - box)
        frames[t] = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return frames, centres


def write_synthetic_dataset(
    out_dir: str | os.PathLike,
    num_videos: int,
    num_frames: int,
    height: int,
    width: int,
    fps: float = 16.0,
    seed: int = 0,
    caption_style: str = "full",
    **world_kwargs,
) -> str:
    """Write ``num_videos`` rendered worlds as mp4 files with ``.txt`` captions and a ``manifest.jsonl``.

    Each manifest line: ``{"video", "caption", "caption_file", "num_frames", "height", "width", "fps",
    "world_seed", "world"}`` with file names relative to ``out_dir`` and ``world`` the spec as a dict
    (:meth:`WorldSpec.from_dict` restores it). ``caption_style`` is :meth:`WorldSpec.caption`'s; ``world_kwargs``
    go to :func:`sample_world`. Returns the manifest path. Deterministic in ``seed``.
    """
    from longgen.io import write_video

    if num_videos < 1:
        raise ValueError(f"num_videos must be >= 1, got {num_videos}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    world_seeds = np.random.default_rng(seed).integers(0, 2**31 - 1, size=num_videos)
    manifest = os.path.join(out_dir, "manifest.jsonl")
    with open(manifest, "w") as fh:
        for i, world_seed in enumerate(world_seeds):
            world = sample_world(int(world_seed), **world_kwargs)
            name = f"video_{i:05d}"
            # Rendered in chunks so that memory does not grow with the clip length.
            chunks = (
                render_clip(world, min(RENDER_CHUNK, num_frames - s), height, width, first_frame=s)[0]
                for s in range(0, num_frames, RENDER_CHUNK)
            )
            write_video(os.path.join(out_dir, f"{name}.mp4"), chunks, fps=fps)
            caption = world.caption(caption_style)
            with open(os.path.join(out_dir, f"{name}.txt"), "w") as cap:
                cap.write(caption + "\n")
            record = {
                "video": f"{name}.mp4",
                "caption": caption,
                "caption_file": f"{name}.txt",
                "num_frames": num_frames,
                "height": height,
                "width": width,
                "fps": fps,
                "world_seed": int(world_seed),
                "world": world.to_dict(),
            }
            fh.write(json.dumps(record) + "\n")
    return manifest


SPEC_NAME = "synthetic_spec.json"


def ensure_synthetic_dataset(folder: str | os.PathLike, data_config) -> str:
    """The synthetic data set a training config describes (``data.synthetic`` and the clip size), written to
    ``folder`` unless the same one is already there (``synthetic_spec.json`` equal). Returns the manifest.
    Call on one process only."""
    syn = data_config.synthetic
    spec = {
        "num_videos": syn.num_videos,
        "num_frames": syn.num_frames,
        "height": syn.height or data_config.height,
        "width": syn.width or data_config.width,
        "fps": syn.fps,
        "seed": syn.seed,
    }
    # The world knobs enter the spec (and so the comparison) only when changed, so that data sets written
    # before they existed still match their spec file.
    if tuple(syn.size_range) != DEFAULT_SIZE_RANGE:
        spec["size_range"] = [float(v) for v in syn.size_range]
    if tuple(syn.num_objects) != DEFAULT_NUM_OBJECTS:
        spec["num_objects"] = [int(v) for v in syn.num_objects]
    if syn.caption_style != "full":
        spec["caption_style"] = syn.caption_style
    if tuple(sorted(syn.colors)) != DEFAULT_COLORS:
        spec["colors"] = sorted(syn.colors)
    folder = os.fspath(folder)
    manifest = os.path.join(folder, "manifest.jsonl")
    spec_path = os.path.join(folder, SPEC_NAME)
    if os.path.exists(manifest) and os.path.exists(spec_path):
        with open(spec_path) as fh:
            if json.load(fh) == spec:
                return manifest
        os.remove(manifest)  # a different data set: written again below
    logging.getLogger(__name__).info("writing the synthetic data set (%d videos) to %s", syn.num_videos, folder)
    kwargs = dict(spec)
    for key in ("size_range", "num_objects", "colors"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    write_synthetic_dataset(folder, **kwargs)
    with open(spec_path, "w") as fh:
        json.dump(spec, fh)
    return manifest


def load_manifest(path: str | os.PathLike) -> list[dict]:
    """Manifest records with ``video`` and ``caption_file`` made absolute and ``world`` a :class:`WorldSpec`."""
    path = os.fspath(path)
    root = os.path.dirname(os.path.abspath(path))
    records = []
    with open(path) as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err})") from err
            rec["video"] = os.path.join(root, rec["video"])
            rec["caption_file"] = os.path.join(root, rec["caption_file"])
            rec["world"] = WorldSpec.from_dict(rec["world"])
            records.append(rec)
    return records
