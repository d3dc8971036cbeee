"""A synthetic video corpus that needs composed retrieval, written as real H.264 mp4 files.

Each video shows one object. Six attributes are captioned, one word each:
"a {colour} {pattern} {shape} {motion} over the {background} at {time}". Three are visible but
never captioned: the object's position, size and speed. Videos come in families that share the
uncaptioned attributes; family members differ from the family's base in exactly one captioned
attribute. A query (video, "make it blue") therefore has one right answer: the family member
(visual evidence) with the named change (textual evidence). Neither half alone suffices.

Family bases are codewords of a Reed-Solomon code over GF(7) (length 6, dimension 3, minimum
distance 4), so captions of different families differ in at least two words: the only one-word
caption pairs in the corpus are the planted ones.
"""

from __future__ import annotations

import json
import math
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from data.captions import CaptionedVideo, write_caption_table

SLOTS: dict[str, tuple[str, ...]] = {
    "colour": ("red", "green", "blue", "yellow", "purple", "cyan", "white"),
    "pattern": ("solid", "striped", "checkered", "hollow", "dotted", "banded", "halved"),
    "shape": ("circle", "square", "diamond", "triangle", "cross", "bar", "crescent"),
    "motion": ("drifting", "rising", "sinking", "bouncing", "orbiting", "zigzagging", "pulsing"),
    "background": ("desert", "forest", "ocean", "snow", "lava", "concrete", "meadow"),
    "time": ("dawn", "noon", "dusk", "night", "twilight", "sunrise", "sunset"),
}
CAPTION = "a {colour} {pattern} {shape} {motion} over the {background} at {time}"
FIELD = 7  # the RS code's field size = values per slot
MAX_FAMILIES = FIELD**3

COLOUR_RGB = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.85, 0.2),
    "blue": (0.15, 0.3, 1.0),
    "yellow": (0.95, 0.9, 0.1),
    "purple": (0.6, 0.15, 0.8),
    "cyan": (0.1, 0.9, 0.9),
    "white": (1.0, 1.0, 1.0),
}
BACKGROUND_RGB = {
    "desert": (0.55, 0.45, 0.3),
    "forest": (0.1, 0.25, 0.12),
    "ocean": (0.05, 0.15, 0.35),
    "snow": (0.75, 0.78, 0.8),
    "lava": (0.35, 0.08, 0.05),
    "concrete": (0.4, 0.4, 0.4),
    "meadow": (0.35, 0.5, 0.2),
}
TIME_TINT = {
    "dawn": (1.0, 0.8, 0.85),
    "noon": (1.0, 1.0, 1.0),
    "dusk": (0.9, 0.65, 0.45),
    "night": (0.35, 0.4, 0.6),
    "twilight": (0.6, 0.5, 0.8),
    "sunrise": (1.0, 0.9, 0.6),
    "sunset": (0.85, 0.5, 0.5),
}
CATEGORIES = ("nature", "abstract", "motion", "colour", "animation", "education", "art", "science")


@dataclass
class VideoSpec:
    videoid: str
    page_dir: str
    family: int
    attributes: dict[str, str]
    position: tuple[float, float]  # path centre, fraction of the frame (uncaptioned)
    size: float  # object radius, fraction of the frame (uncaptioned)
    speed: float  # (uncaptioned)
    phase: float
    author: str | None
    categories: list[str]

    @property
    def pth(self) -> str:
        return f"{self.page_dir}/{self.videoid}"

    @property
    def caption(self) -> str:
        return CAPTION.format(**self.attributes)


def _codeword(index: int) -> list[int]:
    a, b, c = index % FIELD, (index // FIELD) % FIELD, index // FIELD**2
    return [(a + b * x + c * x * x) % FIELD for x in range(len(SLOTS))]


def page_dir(index: int, per_dir: int = 50) -> str:
    lo = (index // per_dir) * per_dir + 1
    return f"{lo:06d}_{lo + per_dir - 1:06d}"


def plan_corpus(videos: int, family_size: int = 5, seed: int = 1234) -> list[VideoSpec]:
    """Deterministic attribute plan: families of `family_size` videos (the last may be smaller)."""
    slot_names = list(SLOTS)
    if not 2 <= family_size <= 1 + len(SLOTS) * (FIELD - 1):
        raise ValueError(f"family_size must be in [2, {1 + len(SLOTS) * (FIELD - 1)}]")
    families = math.ceil(videos / family_size)
    if families > MAX_FAMILIES:
        raise ValueError(f"{videos} videos need {families} families; at most {MAX_FAMILIES}")
    rng = random.Random(seed)
    codes = rng.sample(range(MAX_FAMILIES), families)
    authors = [f"author{i:04d}" for i in range(max(4, families // 2))]
    specs: list[VideoSpec] = []
    for fam, code in enumerate(codes):
        base = _codeword(code)
        # variants: distinct (slot, new value) changes of the base
        changes = [(s, v) for s in range(len(SLOTS)) for v in range(FIELD) if v != base[s]]
        members = [base] + [
            [v if i == s else base[i] for i in range(len(SLOTS))]
            for s, v in rng.sample(changes, family_size - 1)
        ]
        members = members[: videos - len(specs)]
        position = (rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7))
        size, speed = rng.uniform(0.12, 0.24), rng.uniform(0.5, 1.5)
        fam_author = rng.choice(authors)
        fam_cats = rng.sample(CATEGORIES, 2)
        for values in members:
            index = len(specs)
            roll = rng.random()
            author = fam_author if roll < 0.5 else (None if roll < 0.65 else rng.choice(authors))
            cats = fam_cats[:1] if rng.random() < 0.4 else rng.sample(CATEGORIES, 1)
            specs.append(
                VideoSpec(
                    videoid=str(1_000_000 + index),
                    page_dir=page_dir(index),
                    family=fam,
                    attributes={n: SLOTS[n][values[i]] for i, n in enumerate(slot_names)},
                    position=position,
                    size=size,
                    speed=speed,
                    phase=rng.random(),
                    author=author,
                    categories=cats,
                )
            )
    return specs


def _object_state(spec: VideoSpec, t: float) -> tuple[float, float, float]:
    """Centre (x, y) and radius at time t in [0, 1)."""
    cx, cy = spec.position
    s, r = spec.speed, spec.size
    motion = spec.attributes["motion"]
    ramp = 0.4 * s * (t - 0.5)
    wave = 2 * math.pi * (t + spec.phase)
    if motion == "drifting":
        return cx + ramp, cy, r
    if motion == "rising":
        return cx, cy - ramp, r
    if motion == "sinking":
        return cx, cy + ramp, r
    if motion == "bouncing":
        return cx, cy + 0.25 * s * (abs(math.sin(2 * wave)) - 0.5), r
    if motion == "orbiting":
        return cx + 0.15 * s * math.cos(wave), cy + 0.15 * s * math.sin(wave), r
    if motion == "zigzagging":
        tri = abs(((4 * t * s) % 2) - 1) - 0.5
        return cx + ramp, cy + 0.2 * tri, r
    return cx, cy, r * (1 + 0.4 * math.sin(2 * wave * s))  # pulsing


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.85
    if shape == "diamond":
        return abs(u) + abs(v) <= 1.15
    if shape == "triangle":
        return (v <= 0.8) & (abs(u) <= (v + 0.95) * 0.6)
    if shape == "cross":
        return ((abs(u) <= 0.3) | (abs(v) <= 0.3)) & (np.maximum(abs(u), abs(v)) <= 1)
    if shape == "bar":
        return (abs(u) <= 1.05) & (abs(v) <= 0.35)
    return (u * u + v * v <= 1) & ((u - 0.5) ** 2 + v * v > 0.55)  # crescent


def _pattern(pattern: str, shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """1 where the object shows its colour, 0.25 for its dark parts, -1 for see-through."""
    full = np.ones_like(u)
    if pattern == "striped":
        return np.where(np.floor((v + 3) * 2.2) % 2 == 0, 1.0, 0.25)
    if pattern == "banded":
        return np.where(np.floor((u + 3) * 2.2) % 2 == 0, 1.0, 0.25)
    if pattern == "checkered":
        return np.where((np.floor((u + 3) * 2) + np.floor((v + 3) * 2)) % 2 == 0, 1.0, 0.25)
    if pattern == "hollow":
        return np.where(_shape_mask(shape, u / 0.55, v / 0.55), -1.0, 1.0)
    if pattern == "dotted":
        du, dv = (u + 3) % 0.8 - 0.4, (v + 3) % 0.8 - 0.4
        return np.where(du * du + dv * dv < 0.05, 0.25, 1.0)
    if pattern == "halved":
        return np.where(u < 0, 1.0, 0.25)
    return full  # solid


def render_frames(spec: VideoSpec, frames: int, size: int) -> np.ndarray:
    """(frames, size, size, 3) uint8."""
    rng = np.random.default_rng(int(spec.videoid))
    grid = (np.arange(size) + 0.5) / size
    gx, gy = np.meshgrid(grid, grid)
    a = spec.attributes
    texture = 1 + 0.08 * np.repeat(
        np.repeat(rng.standard_normal((size // 8, size // 8)), 8, 0), 8, 1
    )
    background = np.asarray(BACKGROUND_RGB[a["background"]]) * texture[..., None]
    colour = np.asarray(COLOUR_RGB[a["colour"]])
    tint = np.asarray(TIME_TINT[a["time"]])
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for f in range(frames):
        x, y, r = _object_state(spec, f / frames)
        u, v = (gx - x) / r, (gy - y) / r
        mask = _shape_mask(a["shape"], u, v)
        shade = _pattern(a["pattern"], a["shape"], u, v)
        frame = background.copy()
        solid = mask & (shade > 0)
        frame[solid] = colour * shade[solid][:, None]
        out[f] = np.clip(frame * tint * 255, 0, 255).astype(np.uint8)
    return out


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """H.264 (libx264, yuv420p) mp4, written under a temporary name and renamed when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # one x264 thread, which is bit-reproducible: two generations of one corpus differed in
        # 43 of 300 files with threading on (workers give the parallelism)
        stream.options = {"crf": "18", "preset": "veryfast", "threads": "1"}
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    tmp.rename(path)


def visibility_scores(spec: VideoSpec, n: int = 15) -> list[float]:
    """Per-target-frame scores (15 frame centres): how much of the object is inside the frame,
    a stand-in for the reference's frame-to-edit similarity."""
    scores = []
    for i in range(n):
        x, y, r = _object_state(spec, (2 * i + 1) / (2 * n))
        inside = 1.0
        for c in (x, y):
            inside *= max(0.0, min(c + r, 1.0) - max(c - r, 0.0)) / (2 * r)
        scores.append(round(0.2 + 0.2 * inside, 4))
    return scores


def _render_one(job: tuple[VideoSpec, str, int, int, int]) -> str:
    spec, root, frames, size, fps = job
    path = Path(root) / f"{spec.pth}.mp4"
    if not path.exists():  # resumable: finished files are kept
        write_mp4(path, render_frames(spec, frames, size), fps)
    return spec.pth


def write_corpus(
    out_dir: str | Path,
    videos: int = 1000,
    family_size: int = 5,
    frames: int = 16,
    fps: int = 8,
    size: int = 64,
    workers: int = 2,
    seed: int = 1234,
    progress: bool = False,
) -> list[VideoSpec]:
    """Write `videos/<page_dir>/<id>.mp4`, `captions.csv` and `metadata.jsonl` under out_dir."""
    if size % 2:
        raise ValueError(f"size must be even for yuv420p, got {size}")
    out = Path(out_dir)
    specs = plan_corpus(videos, family_size, seed)
    jobs = [(s, str(out / "videos"), frames, size, fps) for s in specs]
    bar = tqdm(total=len(jobs), desc="videos", disable=not progress, mininterval=1.0)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(_render_one, jobs, chunksize=16):
                bar.update()
    else:
        for job in jobs:
            _render_one(job)
            bar.update()
    bar.close()
    duration = f"PT00H00M{max(1, round(frames / fps)):02d}S"
    write_caption_table(
        out / "captions.csv",
        [CaptionedVideo(s.videoid, s.page_dir, s.caption) for s in specs],
        duration=duration,
    )
    with (out / "metadata.jsonl").open("w", encoding="utf-8") as f:
        for s in specs:
            record = {
                "videoid": s.videoid,
                "page_dir": s.page_dir,
                "author": None if s.author is None else {"accountsId": s.author},
                "categories": s.categories,
                "synthetic": {
                    k: v for k, v in asdict(s).items() if k not in ("author", "categories")
                },
            }
            f.write(json.dumps(record) + "\n")
    return specs


def read_specs(corpus_dir: str | Path) -> list[VideoSpec]:
    """The generator's ground truth back from metadata.jsonl."""
    specs = []
    with (Path(corpus_dir) / "metadata.jsonl").open(encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            syn = r["synthetic"]
            syn["position"] = tuple(syn["position"])
            author = r["author"]["accountsId"] if r["author"] else None
            specs.append(VideoSpec(**syn, author=author, categories=r["categories"]))
    return specs
