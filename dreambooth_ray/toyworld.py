"""The toy world: a seeded procedural image generator with captions, small enough to pretrain on a CPU.

Objects of a few classes (toy, dog, cup, ball), each a family of shapes, with a colour, a pattern
(solid, stripes, dots), a size and a position, drawn in one of a few scenes (beach, snow, grass,
city, plain). Captions come from a small grammar: "a red toy on the beach", "a toy", "a dog in the
snow". Everything is a pure function of its seed: `render(attrs)` draws one image, `sample(seed, n)`
draws n (attrs, image, caption) triples, identical on every machine.

Patterns never appear in captions: an instance's pattern (with its colour and shape variant) is the
kind of detail a prompt cannot name and DreamBooth has to learn from the subject's photos.

`Judge` is a toy-world classifier (a small CNN predicting class, colour, scene and pattern) used to
measure whether a model draws what a prompt names.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

RESOLUTION = 32
_SS = 4  # supersampling: draw at 4x, downsample with a box filter (antialiased edges)

CLASSES = ("toy", "dog", "cup", "ball")
COLOURS = {  # name -> RGB
    "red": (210, 40, 40),
    "blue": (40, 70, 220),
    "green": (40, 170, 60),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 190),
}
COLOUR_NAMES = tuple(COLOURS)
PATTERNS = ("solid", "stripes", "dots")
SCENES = ("beach", "snow", "grass", "city", "plain")
SCENE_PHRASES = {
    "beach": "on the beach",
    "snow": "in the snow",
    "grass": "on the grass",
    "city": "in the city",
    "plain": "on a plain background",
}
VARIANTS = 3  # shape variants per class (ear shape, handle side, ...)


@dataclass(frozen=True)
class Attrs:
    cls: str
    colour: str
    pattern: str = "solid"
    scene: str = "plain"
    size: float = 0.6  # object extent as a fraction of the image
    x: float = 0.5  # object centre, fractions of the image
    y: float = 0.55
    variant: int = 0
    bg_seed: int = 0  # scene details (clouds, buildings, snowflakes)

    def to_dict(self) -> dict:
        return asdict(self)


def random_attrs(rng: random.Random, **fixed) -> Attrs:
    a = dict(
        cls=rng.choice(CLASSES), colour=rng.choice(COLOUR_NAMES), pattern=rng.choice(PATTERNS),
        scene=rng.choice(SCENES), size=rng.uniform(0.45, 0.8), x=rng.uniform(0.35, 0.65),
        y=rng.uniform(0.45, 0.62), variant=rng.randrange(VARIANTS), bg_seed=rng.randrange(1 << 30),
    )
    a.update(fixed)
    return Attrs(**a)


def caption(attrs: Attrs, rng: random.Random | None = None, identifier: str | None = None,
            colour: bool | None = None, scene: bool | None = None) -> str:
    """"a [identifier] [colour] class [scene phrase]"; with an rng, colour and scene are each left
    out at random (30%) unless forced, and "a photo of" prefixes 20% of captions."""
    if rng is not None:
        colour = rng.random() < 0.7 if colour is None else colour
        scene = rng.random() < 0.7 if scene is None else scene
        prefix = "a photo of a" if rng.random() < 0.2 else "a"
    else:
        colour = True if colour is None else colour
        scene = True if scene is None else scene
        prefix = "a"
    words = [prefix] + ([identifier] if identifier else []) + ([attrs.colour] if colour else []) + [attrs.cls]
    if scene:
        words.append(SCENE_PHRASES[attrs.scene])
    return " ".join(words)


def vocabulary() -> list[str]:
    words = {"a", "photo", "of"} | set(CLASSES) | set(COLOUR_NAMES)
    for p in SCENE_PHRASES.values():
        words |= set(p.split())
    return sorted(words)


# --- drawing -------------------------------------------------------------------------------------

def _shade(rgb, f):
    return tuple(max(0, min(255, int(c * f))) for c in rgb)


def _draw_scene(d, scene: str, rng: random.Random, S: int) -> None:
    W = S
    if scene == "beach":
        d.rectangle([0, 0, W, W * 0.45], fill=(135, 200, 245))  # sky
        d.rectangle([0, W * 0.45, W, W * 0.6], fill=(30, 110, 190))  # sea
        d.rectangle([0, W * 0.6, W, W], fill=(235, 215, 160))  # sand
        cx = rng.uniform(0.1, 0.9) * W
        d.ellipse([cx - W * 0.07, W * 0.06, cx + W * 0.07, W * 0.2], fill=(255, 235, 120))  # sun
    elif scene == "snow":
        d.rectangle([0, 0, W, W * 0.5], fill=(185, 200, 215))
        d.rectangle([0, W * 0.5, W, W], fill=(248, 250, 255))
        for _ in range(12):
            x, y, r = rng.uniform(0, W), rng.uniform(0, W * 0.5), W * 0.012
            d.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 255))
    elif scene == "grass":
        d.rectangle([0, 0, W, W * 0.5], fill=(120, 185, 240))
        d.rectangle([0, W * 0.5, W, W], fill=(70, 150, 50))
        for _ in range(10):
            x, y = rng.uniform(0, W), rng.uniform(W * 0.55, W)
            d.line([x, y, x + rng.uniform(-2, 2) * S / 64, y - W * 0.05], fill=(40, 110, 30), width=max(1, S // 64))
    elif scene == "city":
        d.rectangle([0, 0, W, W], fill=(170, 175, 185))
        x = 0.0
        while x < W:
            w, h = rng.uniform(0.12, 0.25) * W, rng.uniform(0.35, 0.7) * W
            shade = rng.randint(60, 110)
            d.rectangle([x, W * 0.75 - h, x + w, W * 0.75], fill=(shade, shade, shade + 10))
            for wy in range(int(W * 0.75 - h + W * 0.04), int(W * 0.72), max(1, int(W * 0.08))):
                d.rectangle([x + w * 0.25, wy, x + w * 0.45, wy + W * 0.03], fill=(240, 220, 120))
            x += w + rng.uniform(0.0, 0.04) * W
        d.rectangle([0, W * 0.75, W, W], fill=(80, 80, 85))  # road
    elif scene == "plain":
        g = rng.randint(200, 230)
        d.rectangle([0, 0, W, W], fill=(g, g, g - 8))
    else:
        raise ValueError(f"unknown scene {scene!r}")


def _shape_mask(attrs: Attrs, S: int):
    """The object's silhouette (mode L) and its eyes/details drawn afterwards."""
    from PIL import Image, ImageDraw

    m = Image.new("L", (S, S), 0)
    d = ImageDraw.Draw(m)
    cx, cy, r = attrs.x * S, attrs.y * S, attrs.size * S / 2
    details = []  # (kind, box) drawn in a dark colour after the pattern
    v = attrs.variant
    if attrs.cls == "toy":  # a teddy: round body, head, ears (round / square / pointed by variant)
        hr = r * 0.5
        hy = cy - r * 0.45
        d.ellipse([cx - r * 0.62, cy - r * 0.1, cx + r * 0.62, cy + r * 0.95], fill=255)  # body
        d.ellipse([cx - hr, hy - hr, cx + hr, hy + hr], fill=255)  # head
        for sx in (-1, 1):
            ex, ey, er = cx + sx * hr * 0.8, hy - hr * 0.85, hr * 0.38
            if v == 0:
                d.ellipse([ex - er, ey - er, ex + er, ey + er], fill=255)
            elif v == 1:
                d.rectangle([ex - er, ey - er, ex + er, ey + er], fill=255)
            else:
                d.polygon([(ex - er, ey + er), (ex + er, ey + er), (ex, ey - er * 1.6)], fill=255)
        for sx in (-1, 1):
            details.append(("eye", (cx + sx * hr * 0.4, hy - hr * 0.1, hr * 0.16)))
    elif attrs.cls == "dog":  # a side view: long body, four legs, head, tail; facing left or right
        face = -1 if v == 1 else 1
        bw, bh = r * 1.0, r * 0.42
        d.ellipse([cx - bw, cy - bh, cx + bw, cy + bh], fill=255)
        for lx in (-0.7, -0.35, 0.35, 0.7):
            d.rectangle([cx + lx * bw - r * 0.09, cy, cx + lx * bw + r * 0.09, cy + r * 0.8], fill=255)
        hx, hy, hr = cx + face * bw * 0.95, cy - bh * 1.3, r * 0.38
        d.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=255)
        d.ellipse([hx + face * hr * 0.5 - hr * 0.5, hy - hr * 0.1, hx + face * hr * 0.5 + hr * 0.5 + face * hr * 0.4, hy + hr * 0.55], fill=255)  # snout
        ear = hr * (0.9 if v == 2 else 0.55)
        d.polygon([(hx - face * hr * 0.5, hy - hr * 0.3), (hx - face * hr * 0.1, hy - hr * 0.5),
                   (hx - face * hr * 0.55, hy + ear)], fill=255)
        tx = cx - face * bw
        d.line([tx, cy - bh * 0.2, tx - face * r * 0.35, cy - bh * 1.6], fill=255, width=max(1, int(r * 0.16)))
        details.append(("eye", (hx + face * hr * 0.25, hy - hr * 0.25, hr * 0.16)))
    elif attrs.cls == "cup":  # a mug: a tall body (straight / tapered / wide by variant), a handle ring
        top, bot = cy - r * 0.75, cy + r * 0.8
        w_top = r * (0.62 if v != 2 else 0.8)
        w_bot = r * (0.62 if v == 0 else (0.45 if v == 1 else 0.8))
        d.polygon([(cx - w_top, top), (cx + w_top, top), (cx + w_bot, bot), (cx - w_bot, bot)], fill=255)
        side = 1 if v != 1 else -1
        hx = cx + side * (max(w_top, w_bot) + r * 0.1)
        hr = r * 0.38
        d.ellipse([hx - hr, cy - hr, hx + hr, cy + hr], outline=255, width=max(1, int(r * 0.18)))
        details.append(("rim", (cx - w_top, top, cx + w_top, top + r * 0.12)))
    elif attrs.cls == "ball":  # a sphere with a seam (horizontal / vertical / cross by variant)
        rr = r * 0.8
        d.ellipse([cx - rr, cy - rr * 0.95 + r * 0.15, cx + rr, cy + rr * 0.95 + r * 0.15], fill=255)
        cyb = cy + r * 0.15
        if v in (0, 2):
            details.append(("seam", (cx - rr, cyb, cx + rr, cyb)))
        if v in (1, 2):
            details.append(("seam", (cx, cyb - rr * 0.95, cx, cyb + rr * 0.95)))
        details.append(("shine", (cx - rr * 0.45, cyb - rr * 0.5, rr * 0.18)))
    else:
        raise ValueError(f"unknown class {attrs.cls!r}")
    return m, details


def _pattern_fill(attrs: Attrs, S: int):
    from PIL import Image, ImageDraw

    base = COLOURS[attrs.colour]
    im = Image.new("RGB", (S, S), base)
    d = ImageDraw.Draw(im)
    r = attrs.size * S / 2
    if attrs.pattern == "stripes":
        step = max(2, int(r * 0.38))
        y0 = int(attrs.y * S - r)
        for y in range(y0, S, step):
            d.rectangle([0, y, S, y + step // 2], fill=(245, 245, 245))
    elif attrs.pattern == "dots":
        step, dr = max(2, r * 0.42), r * 0.1
        y = attrs.y * S - r
        row = 0
        while y < S:
            x = attrs.x * S - r + (step / 2 if row % 2 else 0)
            while x < S:
                d.ellipse([x - dr, y - dr, x + dr, y + dr], fill=(250, 250, 250))
                x += step
            y += step
            row += 1
    elif attrs.pattern != "solid":
        raise ValueError(f"unknown pattern {attrs.pattern!r}")
    return im


def render(attrs: Attrs, resolution: int = RESOLUTION):
    """One image (PIL, RGB, resolution x resolution) of `attrs`: deterministic."""
    from PIL import Image, ImageDraw, ImageFilter

    S = resolution * _SS
    rng = random.Random(attrs.bg_seed)
    im = Image.new("RGB", (S, S))
    d = ImageDraw.Draw(im)
    _draw_scene(d, attrs.scene, rng, S)
    mask, details = _shape_mask(attrs, S)
    outline = mask.filter(ImageFilter.MaxFilter(2 * (_SS // 2) + 1))
    im.paste((25, 25, 30), (0, 0), outline)  # a dark outline separates the object from any scene
    im.paste(_pattern_fill(attrs, S), (0, 0), mask)
    dark = _shade(COLOURS[attrs.colour], 0.35)
    for kind, box in details:
        if kind == "eye":
            x, y, rr = box
            rr = max(rr, _SS * 0.6)
            d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=(15, 15, 15))
        elif kind == "shine":
            x, y, rr = box
            d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=(255, 255, 255))
        elif kind == "seam":
            d.line(box, fill=dark, width=max(1, _SS))
        elif kind == "rim":
            d.rectangle(box, fill=dark)
    return im.resize((resolution, resolution), Image.BOX)


def sample(seed: int, n: int, resolution: int = RESOLUTION, **fixed):
    """n (attrs, image, caption) triples, a pure function of (seed, n, fixed attributes)."""
    rng = random.Random(f"toyworld-{seed}")
    out = []
    for _ in range(n):
        a = random_attrs(rng, **fixed)
        out.append((a, render(a, resolution), caption(a, rng)))
    return out


def batch_arrays(seed: int, n: int, resolution: int = RESOLUTION):
    """(uint8 images n x 3 x H x W, captions, label dict of int arrays) for training."""
    import numpy as np

    trip = sample(seed, n, resolution)
    imgs = np.stack([np.asarray(im, dtype=np.uint8).transpose(2, 0, 1) for _, im, _ in trip])
    labels = {
        "cls": np.array([CLASSES.index(a.cls) for a, _, _ in trip]),
        "colour": np.array([COLOUR_NAMES.index(a.colour) for a, _, _ in trip]),
        "scene": np.array([SCENES.index(a.scene) for a, _, _ in trip]),
        "pattern": np.array([PATTERNS.index(a.pattern) for a, _, _ in trip]),
    }
    return imgs, [c for _, _, c in trip], labels


# --- the judge: a toy-world classifier -----------------------------------------------------------

HEADS = {"cls": CLASSES, "colour": COLOUR_NAMES, "scene": SCENES, "pattern": PATTERNS}


def _judge_net():
    import torch.nn as nn

    class Judge(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 32, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.Conv2d(64, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
                nn.Conv2d(64, 96, 3, padding=1), nn.GELU(), nn.MaxPool2d(2), nn.Flatten(),
                nn.Linear(96 * 16, 128), nn.GELU(),
            )
            self.heads = nn.ModuleDict({k: nn.Linear(128, len(v)) for k, v in HEADS.items()})

        def forward(self, x):  # x: float images in [-1, 1], N x 3 x 32 x 32
            h = self.body(x)
            return {k: head(h) for k, head in self.heads.items()}

    return Judge()


def train_judge(seconds: float = 120.0, seed: int = 0, batch: int = 64, data: int = 20000, log=print):
    """Train the classifier on `data` fresh toy-world images for about `seconds`. Returns the model."""
    import time

    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    imgs, _, labels = batch_arrays(seed + 1000, data)
    x_all = torch.from_numpy(imgs).float() / 127.5 - 1
    y_all = {k: torch.from_numpy(v) for k, v in labels.items()}
    net = _judge_net()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    t0, step = time.time(), 0
    while time.time() - t0 < seconds:
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        x = x_all[idx]
        out = net(x)
        loss = sum(F.cross_entropy(out[k], y_all[k][idx]) for k in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 200 == 0:
            log(f"judge step {step} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    net.eval()
    return net


def save_judge(net, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


def load_judge(path):
    from safetensors.torch import load_file

    net = _judge_net()
    net.load_state_dict(load_file(str(path)))
    net.eval()
    return net


def judge_input(images):
    """The judge's input: PIL images (or a uint8 array N x 3 x H x W) as floats in [-1, 1] at its resolution."""
    import numpy as np
    import torch

    if not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(im.convert("RGB").resize((RESOLUTION, RESOLUTION)), dtype=np.uint8).transpose(2, 0, 1)
                           for im in images])
    return torch.from_numpy(images).float() / 127.5 - 1


def judge_predict(net, images) -> list[dict]:
    """Predicted attributes for PIL images (or a uint8 array N x 3 x H x W)."""
    import torch

    with torch.no_grad():
        out = net(judge_input(images))
    preds = {k: out[k].argmax(-1).tolist() for k in HEADS}
    return [{k: HEADS[k][preds[k][i]] for k in HEADS} for i in range(len(images))]


def judge_accuracy(net, seed: int = 99, n: int = 1000) -> dict:
    imgs, _, labels = batch_arrays(seed, n)
    preds = judge_predict(net, imgs)
    return {k: float(np.mean([HEADS[k][labels[k][i]] == p[k] for i, p in enumerate(preds)])) for k in HEADS} \
        if (np := __import__("numpy")) else {}


# --- subjects ------------------------------------------------------------------------------------

# Specific instances with a rare attribute combination: (class, colour, pattern, variant).
SUBJECTS = {
    "toy-purple-dots": dict(cls="toy", colour="purple", pattern="dots", variant=2),
    "dog-yellow-stripes": dict(cls="dog", colour="yellow", pattern="stripes", variant=1),
    "cup-green-dots": dict(cls="cup", colour="green", pattern="dots", variant=2),
}


def subject_photos(name: str, n: int = 5, seed: int = 0) -> list[tuple[Attrs, object]]:
    """n 'photos' of a subject: same instance, different positions, sizes and scenes."""
    rng = random.Random(f"subject-{name}-{seed}")
    fixed = SUBJECTS[name]
    scenes = ["plain", "grass", "city", "plain", "grass", "city"]
    out = []
    for i in range(n):
        a = random_attrs(rng, **fixed, scene=scenes[i % len(scenes)])
        out.append((a, render(a)))
    return out


# --- the shipped pretrained model ----------------------------------------------------------------

def assets_dir():
    from pathlib import Path

    return Path(__file__).resolve().parent / "assets" / "toy"


class ToyAssets:
    """A built-in model folder shipped in assets/toy/ (see tiny.BUILT_IN): `save_pretrained` copies it,
    so `tiny.materialize` puts it in the model cache like any built-in and it loads by the same path."""

    def __init__(self, sub: str = "pipeline"):
        self.src = assets_dir() / sub

    def save_pretrained(self, path) -> None:
        import shutil

        if not (self.src / "model_index.json").exists():
            raise FileNotFoundError(f"the toy model's weights are missing from {self.src} "
                                    "(python benchmarks/pretrain_toy.py writes them)")
        shutil.copytree(self.src, path, dirs_exist_ok=True)


def load_shipped_judge():
    return load_judge(assets_dir() / "judge.safetensors")


def write_subject(name: str, folder, n: int = 5, seed: int = 0) -> list:
    """Save a subject's n photos as PNGs (the images folder of a job's subject)."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (_, im) in enumerate(subject_photos(name, n, seed)):
        paths.append(folder / f"{name}_{i:02d}.png")
        im.save(paths[-1])
    return paths


# --- toy-dino and toy-clip: the judge as `eval`'s metric models -----------------------------------

INSTANCE_HEADS = ("cls", "colour", "pattern")  # what tells one toy-world instance from another


class ToyMetrics:
    """`eval.dino: toy-dino` and `eval.clip: toy-clip`: the judge standing in for DINO and CLIP.

    toy-dino embeds an image as the judge's class, colour and pattern probabilities (an instance, less its
    shape variant; the scene left out, as DINO's subject fidelity should); DIV reads the judge's three
    convolution stages. toy-clip embeds all four heads (scene included, as CLIP-I does), and CLIP-T is the
    share of the attributes a prompt names (class, colour, scene) that the judge sees. Their numbers
    measure the toy world; they are not comparable with the paper's DINO and CLIP figures."""

    def __init__(self, device: str = "cpu"):
        self.net = load_shipped_judge().to(device)
        self.device = device

    def _run(self, images):
        import torch

        h, stages = judge_input(images).to(self.device), []
        with torch.no_grad():
            for layer in self.net.body:
                h = layer(h)
                if isinstance(layer, torch.nn.MaxPool2d):
                    stages.append(h.flatten(2).transpose(1, 2).cpu())  # [N, positions, channels]
            probs = {k: head(h).softmax(-1).cpu() for k, head in self.net.heads.items()}
        return probs, stages

    def dino_features(self, images):
        probs, stages = self._run(images)
        return __import__("torch").cat([probs[k] for k in INSTANCE_HEADS], -1), stages

    def clip_images(self, images):
        probs, _ = self._run(images)
        return __import__("torch").cat([probs[k] for k in HEADS], -1)

    def clip_t(self, features, text: str) -> float | None:
        """Mean over images of the share of the text's named class, colour and scene the judge predicts."""
        words = set(text.lower().replace(",", " ").split())
        named = {k: v for k, vals in (("cls", CLASSES), ("colour", COLOUR_NAMES), ("scene", SCENES))
                 for v in vals if v in words}
        if not named:
            return None
        heads = features.split([len(v) for v in HEADS.values()], -1)
        pred = {k: [HEADS[k][i] for i in h.argmax(-1).tolist()] for k, h in zip(HEADS, heads)}
        hits = [sum(pred[k][i] == v for k, v in named.items()) / len(named) for i in range(len(features))]
        return sum(hits) / len(hits)
