"""The Shapes world: scenes of coloured shapes, their pixel-exact masks, template captions,
and writers that put them on disk in the formats of the real data.

A scene holds 1 to 3 flat-coloured objects (a shape, a colour, a size, a position) on a light
background. `render` draws it with PIL ImageDraw, antialiasing off, and draws every object a
second time into its own "L" image, so each instance mask is exactly the set of pixels painted
with that object's colour (minus whatever a later object covers). `describe` writes a template
caption whose relations ("to the left of", "above", ...) come from the real geometry and whose
first noun is always the shape of an object in the scene.

Writers, so the real loaders read the world unchanged:
- `write_training_shards`: CC3M as img2dataset writes it: `00000.tar`, `00001.tar`, ... holding
  `key.jpg` (JPEG quality 95), `key.txt` (caption) and `key.json` (metadata).
- `write_coco_split`: COCO 2017: `annotations/instances_val2017.json` (RLE masks),
  `annotations/captions_val2017.json` (several captions per image), `val2017/*.png`
  (PNG so the pixels match the masks exactly).
- `generate`: both, under `out_dir/train` and `out_dir/coco`, and a summary.

Determinism: every scene draws from its own generator `np.random.default_rng([seed, stream,
index])`, with one stream per use (training shards, evaluation split, text corpus, in-memory
batches), so the same seed gives identical bytes on disk and the text corpus never repeats
the scenes that are rendered. Coordinates of a scene are fractions of the image side, so one
scene renders at any size.
"""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from mmn.files import atomic_write, write_text

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon",
)
PLURALS: dict[str, str] = {shape: shape + ("es" if shape.endswith(("s", "x")) else "s") for shape in SHAPES}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 10),
    "purple": (130, 40, 180),
    "orange": (245, 120, 10),
}
# Radius of the circle that bounds the shape, as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.07, "medium": 0.10, "large": 0.135}
# Light tints only: every channel >= 215, while every object colour has a channel <= 40,
# so no background pixel (noise included) can take an object's colour or hide an object.
BACKGROUND_TINTS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "grey": (225, 225, 225),
    "cream": (245, 238, 220),
    "pale blue": (222, 234, 248),
    "pale pink": (248, 228, 234),
    "pale green": (226, 244, 226),
}
BACKGROUND_KINDS: tuple[str, ...] = ("plain", "gradient", "noise")
NOISE_AMPLITUDE = 10  # +- grey levels; tints stay >= 215 - 10 > 40

# Streams of the per-scene random generators (see the module docstring).
STREAMS: dict[str, int] = {"train": 0, "eval": 1, "text": 2, "batch": 3}

# Prefixes of the text corpus: the world's LM must learn to continue "A picture of" (the
# captioning prompt) with a caption, as GPT-J learned from web text.
TEXT_PREFIXES: tuple[str, ...] = ("A picture of", "An image of", "A photo of", "This is", "Here is")

NUMBER_WORDS = {2: "two", 3: "three"}

# Which object a caption names first (SceneConfig.order): any of them; the leftmost; or the first
# that a raster scan of the scene's grid meets, top row first, as the image prompts reach the LM.
ORDERS: tuple[str, ...] = ("any", "left_to_right", "reading")

# The grid text (SceneConfig.text_grid): a scene written as its image prompts reach the LM, one
# token per grid cell in raster order, "<bg>" for background and, for a cell an object covers,
# that object's token "<gIcJ>": glyph I (the outline drawn, index in SHAPES) in colour J (index in
# COLOURS). A cell belongs to the object that covers the largest share of it, if >= PATCH_COVER
# (the rule the encoder's probes label patches by, and its tokenizer's).
GRID_BACKGROUND = "<bg>"
GRID_FILLER = "<f{}>"  # with SceneConfig.grid_fillers, a background cell is one of these, drawn per cell
FILLER_TOKEN = re.compile(r"<f(\d+)>")
EMPTY_CELL = re.compile(r"<bg>|<f\d+>")  # what a grid shows where no object is
PATCH_COVER = 0.3
OBJECT_TOKEN = re.compile(r"<g(\d+)c(\d+)>")
GLOSSARY_ENTRY = re.compile(r"<g\d+c\d+> [a-z]+\.")  # "<g2c2> circle." (SceneConfig.grid_glossary)


@dataclass
class SceneConfig:
    """Every knob of the world. Sizes of things are fractions of the image side."""

    image_size: int = 224
    min_objects: int = 1
    max_objects: int = 3
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    sizes: tuple[str, ...] = tuple(SIZES)
    backgrounds: tuple[str, ...] = BACKGROUND_KINDS
    margin: float = 0.02            # keep objects this far from the image border
    gap: float = 0.03               # and this far from each other (bounding circles)
    max_placement_tries: int = 200  # then the best candidate is taken, overlap allowed
    captions_per_image: int = 5     # evaluation split, as COCO
    text_prefix_prob: float = 0.3   # share of text-corpus sentences with a TEXT_PREFIXES prefix
    descriptions_per_text: tuple[float, ...] = (0.3, 0.5, 0.2)  # chances that a text describes its scene 1, 2, 3 times
    jpeg_quality: int = 95
    glyph_shift: bool = False       # each colour draws the shapes shifted along SHAPES (see `glyph_of`)
    order: str = "any"              # which object a caption names first: any, left_to_right, reading (`describe`)
    text_grid: int = 0              # > 0: the LM's texts show each scene as a grid of object tokens (`grid_text`)
    grid_objects_only: float = 0.0  # share of those grids written without their background cells (`text_corpus`)
    grid_glossary: float = 0.0      # share of texts that name each object token's shape (`text_corpus`)
    grid_fillers: int = 0           # > 0: a grid's background cells are filler tokens drawn per cell, not "<bg>" (`grid_text`)
    size_scale: float = 1.0         # multiplies every radius of SIZES (1.5: objects cover 2.25x the pixels)
    size_spread: float = 1.0        # small and large radii moved towards medium (0.4: 0.088 / 0.10 / 0.114; `radius_of`)

    def __post_init__(self) -> None:
        self.shapes, self.colours, self.sizes, self.backgrounds = (
            tuple(self.shapes), tuple(self.colours), tuple(self.sizes), tuple(self.backgrounds))
        self.descriptions_per_text = tuple(float(p) for p in self.descriptions_per_text)
        if not self.descriptions_per_text or min(self.descriptions_per_text) < 0 or sum(self.descriptions_per_text) <= 0:
            raise ValueError(f"SceneConfig.descriptions_per_text={self.descriptions_per_text}: chances of 1, 2, ... "
                             "descriptions must be non-negative and not all zero")
        for name, values, known in [("shapes", self.shapes, SHAPES), ("colours", self.colours, COLOURS),
                                    ("sizes", self.sizes, SIZES), ("backgrounds", self.backgrounds, BACKGROUND_KINDS)]:
            unknown = [v for v in values if v not in known]
            if unknown or not values:
                raise ValueError(f"SceneConfig.{name}: unknown or empty {unknown or values}; known: {list(known)}")
        if not 1 <= self.min_objects <= self.max_objects <= 3:
            raise ValueError(f"SceneConfig: need 1 <= min_objects <= max_objects <= 3, got "
                             f"{self.min_objects}..{self.max_objects}")
        if not 0 <= self.size_spread <= 1:
            raise ValueError(f"SceneConfig.size_spread={self.size_spread} must be in [0, 1]")
        if not (0 < self.size_scale and radius_of("large", self) + self.margin < 0.5):
            raise ValueError(f"SceneConfig.size_scale={self.size_scale}: the largest object (radius "
                             f"{radius_of('large', self) / (self.size_scale or 1):.3f} x size_scale, plus the margin) "
                             "must fit in the image")
        if self.image_size < 16:
            raise ValueError(f"SceneConfig.image_size={self.image_size} is too small (>= 16)")
        if self.order not in ORDERS:
            raise ValueError(f"SceneConfig.order={self.order!r}; known: {list(ORDERS)}")
        if self.order == "reading" and self.text_grid < 1:
            raise ValueError("SceneConfig.order='reading' reads the scene on its grid: set text_grid >= 1")
        if self.text_grid < 0:
            raise ValueError(f"SceneConfig.text_grid={self.text_grid} must be >= 0")
        if self.grid_fillers < 0:
            raise ValueError(f"SceneConfig.grid_fillers={self.grid_fillers} must be >= 0")


def scene_config(cfg: SceneConfig | Mapping[str, Any] | None = None) -> SceneConfig:
    """A SceneConfig from None (defaults), a SceneConfig, or a mapping such as a Hydra node."""
    if cfg is None:
        return SceneConfig()
    if isinstance(cfg, SceneConfig):
        return cfg
    known = {f.name for f in fields(SceneConfig)}
    unknown = [k for k in cfg.keys() if k not in known]
    if unknown:
        raise ValueError(f"unknown Shapes world config key(s) {unknown}; known: {sorted(known)}")
    return SceneConfig(**{k: (tuple(v) if not isinstance(v, (int, float, str)) else v) for k, v in cfg.items()})


@dataclass
class WorldObject:
    shape: str
    colour: str
    size: str
    center: tuple[float, float]  # (x, y), fractions of the image side, y pointing down
    radius: float                # radius of the bounding circle, fraction of the image side
    glyph: str | None = None     # the outline drawn for the shape (None: the shape's own; see glyph_of)


@dataclass
class Background:
    kind: str                                # "plain" | "gradient" | "noise"
    tint: str                                # name in BACKGROUND_TINTS (the plain / base colour)
    second_tint: str | None = None           # gradient end colour
    direction: str | None = None             # gradient: "horizontal" | "vertical" | "diagonal"
    noise_seed: int | None = None            # noise texture


@dataclass
class Scene:
    objects: list[WorldObject]
    background: Background

    def to_json(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- sampling

def radius_of(size: str, cfg: SceneConfig) -> float:
    """An object's bounding radius: SIZES[size] moved towards the medium radius by size_spread, times size_scale."""
    medium = SIZES["medium"]
    return (medium + cfg.size_spread * (SIZES[size] - medium)) * cfg.size_scale


def sample_scene(rng: np.random.Generator, cfg: SceneConfig | Mapping | None = None) -> Scene:
    """Sample objects (mostly non-overlapping: positions are rejection-sampled) and a background."""
    cfg = scene_config(cfg)
    n_objects = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objects: list[WorldObject] = []
    for _ in range(n_objects):
        size = str(rng.choice(cfg.sizes))
        radius = radius_of(size, cfg)
        low, high = radius + cfg.margin, 1.0 - radius - cfg.margin
        best, best_clearance = None, -math.inf
        for _ in range(cfg.max_placement_tries):
            x, y = (float(v) for v in rng.uniform(low, high, size=2))
            clearance = min((math.hypot(x - o.center[0], y - o.center[1]) - radius - o.radius
                             for o in objects), default=math.inf)
            if clearance > best_clearance:
                best, best_clearance = (x, y), clearance
            if clearance >= cfg.gap:
                break
        shape, colour = str(rng.choice(cfg.shapes)), str(rng.choice(cfg.colours))
        objects.append(WorldObject(shape=shape, colour=colour, size=size, center=best, radius=radius,
                                   glyph=glyph_of(shape, colour) if cfg.glyph_shift else None))

    kind = str(rng.choice(cfg.backgrounds))
    tints = list(BACKGROUND_TINTS)
    tint = str(rng.choice(tints))
    background = Background(kind=kind, tint=tint)
    if kind == "gradient":
        background.second_tint = str(rng.choice([t for t in tints if t != tint]))
        background.direction = str(rng.choice(["horizontal", "vertical", "diagonal"]))
    elif kind == "noise":
        background.noise_seed = int(rng.integers(2**31))
    return Scene(objects=objects, background=background)


def glyph_of(shape: str, colour: str) -> str:
    """The outline a shape is drawn with when `SceneConfig.glyph_shift` is on: colour number j (in
    COLOURS' order) draws shape number i as SHAPES[(i + j) % 8], so red draws every shape as itself,
    green draws a circle as a square, blue as a triangle, and so on.

    Why: what the world's words name is then a function of outline and colour together that no
    linear map computes (the best linear read-out of shape from exact outline and colour codes is
    right 17% of the time, chance 12.5%; docs/shapes_world_2.md), as a real category is a non-linear
    function of what an image encoder sees. A linear projection can then not write the shape word
    into the LM itself, and the LM's MLP units have a translation to do."""
    return SHAPES[(SHAPES.index(shape) + list(COLOURS).index(colour)) % len(SHAPES)]


def scene_at(seed: int, stream: str, index: int, cfg: SceneConfig | Mapping | None = None
             ) -> tuple[Scene, np.random.Generator]:
    """Scene number `index` of a stream ("train", "eval", "text", "batch"), and its generator
    (positioned after the scene, ready for `describe`). What the writers use, so tests and
    analyses can re-create any written scene."""
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; known: {list(STREAMS)}")
    rng = np.random.default_rng([seed, STREAMS[stream], index])
    return sample_scene(rng, cfg), rng


# ----------------------------------------------------------------------------- rendering

def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices in pixels (None for the circle, drawn as an ellipse)."""
    def ring(n: int, radius: float, start_deg: float) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(math.radians(start_deg + 360 * k / n)),
                 cy + radius * math.sin(math.radians(start_deg + 360 * k / n))) for k in range(n)]

    if shape == "circle":
        return None
    if shape == "square":
        h = r * 0.8
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # pointing up, nudged down so it sits in its circle's centre of mass
        return [(x, y + 0.15 * r) for x, y in ring(3, r, -90)]
    if shape == "star":
        outer, inner = ring(5, r, -90), ring(5, 0.42 * r, -90 + 36)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "heart":
        ts = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        xs = 16 * np.sin(ts) ** 3
        ys = 13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts)
        return [(cx + r * x / 17, cy - r * (y + 2.5) / 17) for x, y in zip(xs, ys)]
    if shape == "cross":
        a, w = r * 0.9, r * 0.32
        return [(cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w), (cx + a, cy + w),
                (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a), (cx - w, cy + w), (cx - a, cy + w),
                (cx - a, cy - w), (cx - w, cy - w)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.65 * r, cy), (cx, cy + r), (cx - 0.65 * r, cy)]
    if shape == "hexagon":
        return ring(6, r * 0.95, 0)
    raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")


def _draw_shape(draw: ImageDraw.ImageDraw, obj: WorldObject, image_size: int, fill) -> None:
    cx, cy, r = obj.center[0] * image_size, obj.center[1] * image_size, obj.radius * image_size
    polygon = _shape_polygon(obj.glyph or obj.shape, cx, cy, r)
    if polygon is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def render_background(background: Background, image_size: int) -> np.ndarray:
    """uint8 [H, W, 3]."""
    base = np.array(BACKGROUND_TINTS[background.tint], dtype=np.float32)
    if background.kind == "plain":
        return np.broadcast_to(base.astype(np.uint8), (image_size, image_size, 3)).copy()
    if background.kind == "gradient":
        end = np.array(BACKGROUND_TINTS[background.second_tint], dtype=np.float32)
        ramp = np.linspace(0.0, 1.0, image_size, dtype=np.float32)
        if background.direction == "horizontal":
            t = np.broadcast_to(ramp[None, :], (image_size, image_size))
        elif background.direction == "vertical":
            t = np.broadcast_to(ramp[:, None], (image_size, image_size))
        else:
            t = (ramp[None, :] + ramp[:, None]) / 2
        pixels = base + (end - base) * t[..., None]  # [H, W, 3]
        return np.rint(pixels).astype(np.uint8)
    if background.kind == "noise":
        noise_rng = np.random.default_rng(background.noise_seed)
        noise = noise_rng.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, size=(image_size, image_size, 1))
        return np.clip(base.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    raise ValueError(f"unknown background kind {background.kind!r}; known: {list(BACKGROUND_KINDS)}")


def render(scene: Scene, image_size: int = 224) -> tuple[Image.Image, list[np.ndarray]]:
    """The RGB image and one bool mask [H, W] per object, in the scene's order (`object_masks`)."""
    image = Image.fromarray(render_background(scene.background, image_size), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj, image_size, COLOURS[obj.colour])
    return image, object_masks(scene, image_size)


def object_masks(scene: Scene, image_size: int) -> list[np.ndarray]:
    """One bool mask [H, W] per object. Objects are painted in order, so a later object covers an
    earlier one; each object is drawn a second time into its own "L" image with the same
    rasteriser, and its mask is what it painted minus what a later object covers: pixel-exact."""
    masks = []
    for obj in scene.objects:
        mask_image = Image.new("L", (image_size, image_size), 0)
        _draw_shape(ImageDraw.Draw(mask_image), obj, image_size, 255)
        masks.append(np.asarray(mask_image) > 0)
    covered = np.zeros((image_size, image_size), dtype=bool)
    for i in reversed(range(len(masks))):
        masks[i] = masks[i] & ~covered
        covered |= masks[i]
    return masks


def render_batch(seed: int, n: int, cfg: SceneConfig | Mapping | None = None) -> tuple[np.ndarray, list[str]]:
    """Render n scenes of the "batch" stream in memory: (uint8 [n, H, W, 3], captions).
    For the world-part trainers; different seeds give different batches."""
    cfg = scene_config(cfg)
    images = np.empty((n, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    captions = []
    for i in range(n):
        scene, rng = scene_at(seed, "batch", i, cfg)
        image, _ = render(scene, cfg.image_size)
        images[i] = np.asarray(image)
        captions.append(describe(scene, rng, cfg.order, cfg.text_grid))
    return images, captions


# ----------------------------------------------------------------------------- grid text

def object_token(glyph: str, colour: str) -> str:
    """The grid text's token for an object drawn as `glyph` in `colour`: "<g2c1>" (triangle, green)."""
    return f"<g{SHAPES.index(glyph)}c{list(COLOURS).index(colour)}>"


def grid_tokens(fillers: int = 0) -> list[str]:
    """Every token a grid text uses: background, then each (glyph, colour) pair, then `fillers` filler tokens."""
    return ([GRID_BACKGROUND] + [object_token(glyph, colour) for glyph in SHAPES for colour in COLOURS]
            + [GRID_FILLER.format(k) for k in range(fillers)])


def object_grid(scene: Scene, grid: int) -> np.ndarray:
    """The object each cell of a grid x grid raster of the scene belongs to, -1 for background:
    int [grid * grid], cells in raster order (the order of the encoder's patches)."""
    cell = 4  # pixels per cell: enough to measure cover, cheap enough for the LM's 40,000 texts
    masks = object_masks(scene, grid * cell)
    cover = np.stack([m.reshape(grid, cell, grid, cell).mean(axis=(1, 3)).reshape(-1) for m in masks])  # [n_obj, n_cell]
    owner = cover.argmax(axis=0)
    return np.where(cover.max(axis=0) >= PATCH_COVER, owner, -1)


def grid_text(scene: Scene, grid: int, fillers: int = 0, rng: np.random.Generator | None = None) -> str:
    """The scene as a grid text: grid * grid tokens, no separators ("<bg><bg><g2c1><g2c1>..."). With
    `fillers`, each background cell is a filler token drawn from `rng` ("<f17><f3><g2c1>..."), so
    that no one token means background."""
    tokens = [object_token(o.glyph or o.shape, o.colour) for o in scene.objects]
    owners = object_grid(scene, grid)
    empty = ([GRID_FILLER.format(k) for k in rng.integers(fillers, size=len(owners))] if fillers
             else [GRID_BACKGROUND] * len(owners))  # what each cell shows if no object covers it
    return "".join(tokens[owner] if owner >= 0 else empty[cell] for cell, owner in enumerate(owners))


def reading_order(scene: Scene, grid: int) -> list[WorldObject]:
    """The scene's objects in the order a raster scan of its grid meets them (an object that owns no
    cell counts from the cell of its centre)."""
    owners = object_grid(scene, grid)
    def first_cell(index: int) -> int:
        cells = np.flatnonzero(owners == index)
        x, y = scene.objects[index].center
        return int(cells[0]) if len(cells) else min(int(y * grid), grid - 1) * grid + min(int(x * grid), grid - 1)
    return [scene.objects[i] for i in sorted(range(len(scene.objects)), key=first_cell)]


# ----------------------------------------------------------------------------- captions

def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def first_shape(caption: str) -> str | None:
    """The shape named by the first shape word (singular or plural) of a caption, or None."""
    singular = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}
    for word in caption.lower().replace(",", " ").replace(".", " ").split():
        if word in singular:
            return singular[word]
    return None


def _noun_phrase(obj: WorldObject, rng: np.random.Generator) -> str:
    """'red circle', 'small red circle' or 'large circle' (no article)."""
    style = rng.random()
    if style < 0.6:
        return f"{obj.colour} {obj.shape}"
    if style < 0.9:
        return f"{obj.size} {obj.colour} {obj.shape}"
    return f"{obj.size} {obj.shape}"


def _relation(a: WorldObject, b: WorldObject, rng: np.random.Generator) -> str:
    """Where a is relative to b, from the dominant axis of their centres (y points down)."""
    dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
    if abs(dx) >= abs(dy):
        return str(rng.choice(["to the left of" if dx < 0 else "to the right of", "next to", "beside"]))
    return "above" if dy < 0 else "below"


def _position(obj: WorldObject) -> str:
    x, y = obj.center
    col = "left" if x < 1 / 3 else ("right" if x > 2 / 3 else None)
    row = "top" if y < 1 / 3 else ("bottom" if y > 2 / 3 else None)
    if col and row:
        return f"in the {row} {col} corner"
    if col:
        return f"on the {col}"
    if row:
        return f"at the {row}"
    return "in the middle"


def caption_order(scene: Scene, order: str = "any", grid: int = 0) -> list[WorldObject]:
    """The order in which `describe` names the scene's objects: as sampled ("any"), from left to
    right, or in the order a raster scan of its grid x grid cells meets them ("reading")."""
    if order == "left_to_right":
        return sorted(scene.objects, key=lambda o: o.center[0])
    return reading_order(scene, grid) if order == "reading" else list(scene.objects)


def describe(scene: Scene, rng: np.random.Generator, order: str = "any", grid: int = 0,
             in_order: list[WorldObject] | None = None) -> str:
    """A template caption. Its first noun is the shape of an object in the scene: any of them, or,
    with order "left_to_right" (or "reading"), the leftmost one (or the first a raster scan of the
    grid x grid cells meets); the caption then lists its objects in that order, so the first noun
    is not a guess between the objects. `in_order` is caption_order(scene, order, grid) where the
    caller has it already: the reading order rasterises the scene, which costs more than the caption."""
    objects = list(scene.objects)
    rank = {id(o): k for k, o in enumerate(caption_order(scene, order, grid) if in_order is None else in_order)}
    def ordered(chosen: list[WorldObject]) -> list[WorldObject]:
        return chosen if order == "any" else sorted(chosen, key=lambda o: rank[id(o)])

    groups = Counter((o.shape, o.colour) for o in objects)

    if len(objects) > 1 and len(groups) == 1:  # all identical: "two blue triangles"
        shape, colour = objects[0].shape, objects[0].colour
        number, style = NUMBER_WORDS[len(objects)], rng.random()
        if style < 0.5:
            return f"{number} {colour} {PLURALS[shape]}"
        if style < 0.75:
            return f"{number} {PLURALS[shape]}, {'both' if len(objects) == 2 else 'all'} {colour}"
        sizes = {o.size for o in objects}
        if len(sizes) == 1:
            return f"{number} {sizes.pop()} {colour} {PLURALS[shape]}"
        return f"{number} {colour} {PLURALS[shape]} of different sizes"

    if len(objects) == 1:
        obj = objects[0]
        style = rng.random()
        phrase = with_article(_noun_phrase(obj, rng))
        if style < 0.4:
            return phrase
        if style < 0.7:
            return f"{phrase} {_position(obj)}"
        if scene.background.kind == "plain":
            return f"{phrase} on {with_article(scene.background.tint)} background"
        return f"{phrase} on a light background"

    if len(objects) == 3 and max(groups.values()) == 2:  # "two red circles and a blue square"
        (shape, colour), _ = groups.most_common(1)[0]
        odd = next(o for o in objects if (o.shape, o.colour) != (shape, colour))
        pair = f"{NUMBER_WORDS[2]} {colour} {PLURALS[shape]}"
        pair_first = rng.random() < 0.5
        if order != "any":
            pair_first = ordered(objects)[0] is not odd
        if pair_first:
            return f"{pair} and {with_article(_noun_phrase(odd, rng))}"
        return f"{with_article(_noun_phrase(odd, rng))} and {pair}"

    if len(objects) == 2:
        a, b = ordered([objects[i] for i in rng.permutation(2)])
        style = rng.random()
        if a.shape == b.shape and style < 0.2:
            return f"two {PLURALS[a.shape]}, one {a.colour} and one {b.colour}"
        if style < 0.35:
            return f"{with_article(_noun_phrase(a, rng))} and {with_article(_noun_phrase(b, rng))}"
        return f"{with_article(_noun_phrase(a, rng))} {_relation(a, b, rng)} {with_article(_noun_phrase(b, rng))}"

    # three objects, at most one of each (shape, colour)
    style = rng.random()
    if style < 0.3 and order != "reading":
        phrases = [with_article(_noun_phrase(o, rng)) for o in sorted(objects, key=lambda o: o.center[0])]
        return f"{phrases[0]}, {phrases[1]} and {phrases[2]}, from left to right"
    if style < 0.55:
        a, b, c = ordered([objects[i] for i in rng.permutation(3)])
        return (f"{with_article(_noun_phrase(a, rng))} {_relation(a, b, rng)} "
                f"{with_article(_noun_phrase(b, rng))}, and {with_article(_noun_phrase(c, rng))}")
    phrases = [with_article(_noun_phrase(o, rng)) for o in ordered([objects[i] for i in rng.permutation(3)])]
    return f"{phrases[0]}, {phrases[1]} and {phrases[2]}"


def text_corpus(n: int, seed: int, cfg: SceneConfig | Mapping | None = None) -> list[str]:
    """n short documents for the world's language model, each about one scene that is sampled
    but never rendered (stream "text"), so the LM sees only text.

    A document describes its scene one to three times in different words ("a red circle next
    to a blue square. A picture of a blue square and a red circle"). Documents in which earlier
    text predicts later text are what make an LM read its context, as real LMs do; an LM trained
    on independent one-line captions learns to ignore everything before the sentence it is in,
    and then no image prompt can steer it. Descriptions after the first, and a share
    `cfg.text_prefix_prob` of first ones, carry a prefix from TEXT_PREFIXES, so the LM learns to
    continue the captioning prompt ("A picture of") with what its context showed.

    With `cfg.text_grid`, a document shows its scene first as a grid text (`grid_text`), the way
    image prompts show it to the LM, and then describes it one to three times: the image prompts'
    place is the grid's, and the first description follows it as a caption follows the image
    prompts ("...<bg><g2c1><g2c1><bg>... a green triangle", or "...<bg>A picture of a green
    triangle"). The grid's tokens name what is drawn (glyph and colour), the descriptions name
    shapes, so with glyph_shift the LM learns to translate one into the other. A share
    `cfg.grid_glossary` of the documents are glossary lines instead ("<g2c1> circle. <g5c3>
    star."), which put each shape word right after its object token: without them the LM learned
    the colours but not the shapes within its 1,000 steps (a grid's shape words are an XOR of
    glyph and colour, with no first-order signal to start from; docs/shapes_world_2.md, section
    13). A share `cfg.grid_objects_only` of the grids leave out their background cells."""
    cfg = scene_config(cfg)
    documents = []
    for i in range(n):
        scene, rng = scene_at(seed, "text", i, cfg)
        if cfg.text_grid and rng.random() < cfg.grid_glossary:
            documents.append(" ".join(f"{object_token(o.glyph or o.shape, o.colour)} {o.shape}."
                                      for o in reading_order(scene, cfg.text_grid)))
            continue
        chances = cfg.descriptions_per_text
        n_descriptions = int(rng.choice(np.arange(1, len(chances) + 1), p=np.asarray(chances) / sum(chances)))
        sentences = []
        for j in range(n_descriptions):
            caption = describe(scene, rng, cfg.order, cfg.text_grid)
            if j > 0 or rng.random() < cfg.text_prefix_prob:
                prefix = str(rng.choice(TEXT_PREFIXES))
                if prefix in ("This is", "Here is") and caption.split()[0] in NUMBER_WORDS.values():
                    prefix = "These are" if prefix == "This is" else "Here are"
                caption = f"{prefix} {caption}"
            sentences.append(caption)
        text = ". ".join(sentences)
        if cfg.text_grid:
            grid = grid_text(scene, cfg.text_grid, cfg.grid_fillers, rng)
            if rng.random() < cfg.grid_objects_only:
                grid = EMPTY_CELL.sub("", grid)
            text = grid + (text if text[0].isupper() else " " + text)
        documents.append(text)
    return documents


# ----------------------------------------------------------------------------- writers

def _object_record(obj: WorldObject, image_size: int) -> dict:
    cx, cy, r = obj.center[0] * image_size, obj.center[1] * image_size, obj.radius * image_size
    return {"shape": obj.shape, "colour": obj.colour, "size": obj.size,
            "center": [round(cx, 3), round(cy, 3)], "radius": round(r, 3),
            "bbox": [round(cx - r, 3), round(cy - r, 3), round(2 * r, 3), round(2 * r, 3)]}


def _add_to_tar(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata: same seed -> same bytes
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def _write_shard(path: Path, shard_index: int, indices: range, index_digits: int, seed: int, cfg: SceneConfig,
                 progress) -> None:
    """One webdataset tar of the training images `indices` (write_training_shards)."""
    start = indices.start
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in indices:
            key = f"{shard_index:05d}{i - start:0{index_digits}d}"
            scene, rng = scene_at(seed, "train", i, cfg)
            image, _ = render(scene, cfg.image_size)
            caption = describe(scene, rng, cfg.order, cfg.text_grid)
            jpeg = io.BytesIO()
            image.save(jpeg, format="JPEG", quality=cfg.jpeg_quality)
            meta = {"key": key, "caption": caption, "width": cfg.image_size, "height": cfg.image_size,
                    "status": "success", "objects": [_object_record(o, cfg.image_size) for o in scene.objects]}
            _add_to_tar(tar, f"{key}.jpg", jpeg.getvalue())
            _add_to_tar(tar, f"{key}.txt", caption.encode("utf-8"))
            _add_to_tar(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
            progress.update(1)


def write_training_shards(out_dir: str | Path, n_images: int, seed: int,
                          cfg: SceneConfig | Mapping | None = None, shard_size: int = 1000) -> list[Path]:
    """CC3M in img2dataset's webdataset layout: out_dir/00000.tar, ... each holding, per sample,
    key.jpg (JPEG quality cfg.jpeg_quality), key.txt (caption) and key.json (key, caption, width,
    height, status, objects). Keys are img2dataset's: 5-digit shard number then the index in the
    shard, zero-padded to max(4, digits of shard_size - 1) digits ("000000000" by default).
    Returns the shard paths."""
    cfg = scene_config(cfg)
    if n_images < 1 or shard_size < 1:
        raise ValueError(f"write_training_shards: n_images={n_images} and shard_size={shard_size} must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index_digits = max(4, len(str(shard_size - 1)))
    paths = []
    progress = tqdm(total=n_images, desc=f"Shapes world: training shards -> {out_dir}", unit="img")
    for shard_index, start in enumerate(range(0, n_images, shard_size)):
        path = out_dir / f"{shard_index:05d}.tar"
        indices = range(start, min(start + shard_size, n_images))
        atomic_write(path, lambda temporary: _write_shard(temporary, shard_index, indices, index_digits, seed, cfg,
                                                          progress))
        paths.append(path)
    progress.close()
    # Shards of an earlier, larger run would otherwise be read by a "*.tar" glob.
    for stale in sorted(out_dir.glob("[0-9][0-9][0-9][0-9][0-9].tar")):
        if stale not in paths:
            stale.unlink()
    return paths


def eval_captions(scene: Scene, rng: np.random.Generator, n: int, order: str = "any", grid: int = 0) -> list[str]:
    """n captions of one scene, all different where the templates allow; when fewer fit the
    scene (e.g. "two blue triangles"), the different ones repeat in turn."""
    distinct: list[str] = []
    in_order = caption_order(scene, order, grid)
    for _ in range(20 * n):
        caption = describe(scene, rng, order, grid, in_order)
        if caption not in distinct:
            distinct.append(caption)
        if len(distinct) == n:
            break
    return (distinct * n)[:n]


def write_coco_split(out_dir: str | Path, n_images: int, seed: int,
                     cfg: SceneConfig | Mapping | None = None, split: str = "val2017") -> dict:
    """COCO 2017 layout: out_dir/annotations/instances_{split}.json (one annotation per object:
    RLE of its exact mask, area, bbox, iscrowd 0, category_id; plus the object's colour and size),
    out_dir/annotations/captions_{split}.json (cfg.captions_per_image captions per image) and
    out_dir/{split}/000000000001.png, ... Image and annotation ids start at 1.
    Returns {"instances": path, "captions": path, "images": folder, "n_images", "n_annotations"}."""
    from pycocotools import mask as mask_utils

    cfg = scene_config(cfg)
    if n_images < 1:
        raise ValueError(f"write_coco_split: n_images={n_images} must be >= 1")
    out_dir = Path(out_dir)
    image_dir, annotation_dir = out_dir / split, out_dir / "annotations"
    image_dir.mkdir(parents=True, exist_ok=True)
    annotation_dir.mkdir(parents=True, exist_ok=True)
    category_ids = {shape: k + 1 for k, shape in enumerate(SHAPES)}
    info = {"description": "Shapes world (synthetic), COCO 2017 layout", "version": "1.0", "year": 2024,
            "seed": seed}
    licenses = [{"id": 1, "name": "CC0", "url": ""}]
    images, instances, captions = [], [], []
    size = cfg.image_size
    for i in tqdm(range(n_images), desc=f"Shapes world: COCO split -> {out_dir}", unit="img"):
        image_id = i + 1
        scene, rng = scene_at(seed, "eval", i, cfg)
        image, masks = render(scene, size)
        file_name = f"{image_id:012d}.png"
        image.save(image_dir / file_name, format="PNG", compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size, "license": 1})
        for obj, mask in zip(scene.objects, masks):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            ys, xs = np.nonzero(mask)
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            instances.append({"id": len(instances) + 1, "image_id": image_id,
                              "category_id": category_ids[obj.shape],
                              "segmentation": {"size": [size, size], "counts": rle["counts"].decode("ascii")},
                              "area": int(mask.sum()), "bbox": bbox, "iscrowd": 0,
                              "colour": obj.colour, "size": obj.size})
        for caption in eval_captions(scene, rng, cfg.captions_per_image, cfg.order, cfg.text_grid):
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": caption})
    categories = [{"id": category_ids[s], "name": s, "supercategory": "shape"} for s in SHAPES]
    instances_path = annotation_dir / f"instances_{split}.json"
    captions_path = annotation_dir / f"captions_{split}.json"
    write_text(json.dumps({"info": info, "licenses": licenses, "images": images, "annotations": instances,
                           "categories": categories}), instances_path)
    write_text(json.dumps({"info": info, "licenses": licenses, "images": images, "annotations": captions}),
               captions_path)
    return {"instances": instances_path, "captions": captions_path, "images": image_dir,
            "n_images": len(images), "n_annotations": len(instances)}


def generate(out_dir: str | Path, *, n_train: int, n_eval: int, seed: int,
             cfg: SceneConfig | Mapping | None = None, shard_size: int = 1000) -> dict:
    """Write the training shards (out_dir/train) and the COCO-style evaluation split
    (out_dir/coco); return a summary: counts per shape / colour / size / background over both
    splits, objects-per-image histogram, caption examples, caption vocabulary size, paths and
    elapsed seconds."""
    cfg = scene_config(cfg)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    shards = write_training_shards(out_dir / "train", n_train, seed, cfg, shard_size=shard_size)
    coco = write_coco_split(out_dir / "coco", n_eval, seed, cfg)

    # Statistics re-sample the scenes (cheap, no rendering) rather than thread counters through the writers.
    shapes, colours, sizes, backgrounds, per_image = Counter(), Counter(), Counter(), Counter(), Counter()
    vocabulary: set[str] = set()
    examples = []
    for stream, n in (("train", n_train), ("eval", n_eval)):
        for i in range(n):
            scene, rng = scene_at(seed, stream, i, cfg)
            shapes.update(o.shape for o in scene.objects)
            colours.update(o.colour for o in scene.objects)
            sizes.update(o.size for o in scene.objects)
            backgrounds[scene.background.kind] += 1
            per_image[len(scene.objects)] += 1
            caption = describe(scene, rng, cfg.order, cfg.text_grid)
            vocabulary.update(caption.replace(",", " ").split())
            if len(examples) < 10:
                examples.append(caption)
    return {
        "seed": seed, "n_train": n_train, "n_eval": n_eval, "image_size": cfg.image_size,
        "train_shards": [str(p) for p in shards], "coco_root": str(out_dir / "coco"),
        "n_eval_annotations": coco["n_annotations"],
        "shapes": dict(sorted(shapes.items())), "colours": dict(sorted(colours.items())),
        "sizes": dict(sorted(sizes.items())), "backgrounds": dict(sorted(backgrounds.items())),
        "objects_per_image": {int(k): v for k, v in sorted(per_image.items())},
        "caption_examples": examples, "vocabulary_size": len(vocabulary),
        "elapsed_s": round(time.perf_counter() - start, 2),
    }
