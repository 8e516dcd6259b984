"""Samples: the subject rendered in new contexts, one captioned PNG grid per subject."""

from __future__ import annotations

import io
import textwrap

import torch
from PIL import Image, ImageDraw, ImageFont

from .models import generate
from .spec import SampleConfig, Subject


def render(pipe, subject: Subject, cfg: SampleConfig, resolution: int) -> list[tuple[str, Image.Image]]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = pipe.to(device)
    out = []
    for i, template in enumerate(cfg.prompts):
        prompt = subject.prompt(template)
        g = [torch.Generator(device).manual_seed(cfg.seed + 1000 * i + j) for j in range(cfg.images_per_prompt)]
        images = generate(pipe, [prompt] * cfg.images_per_prompt, height=resolution, width=resolution, generator=g,
                          num_inference_steps=cfg.inference_steps, guidance_scale=cfg.guidance_scale)
        out += [(prompt, im) for im in images]
    return out


def through_sr(items: list[tuple[str, Image.Image]], sr_pipe, cfg, seed: int) -> list[tuple[str, Image.Image]]:
    """The cascade: each base image upscaled by the trained SR stage, shown beside it."""
    from .sr import upscale

    out = []
    for k, (prompt, im) in enumerate(items):
        hi = upscale(sr_pipe, prompt, im, cfg, seed + k)
        out += [(f"{prompt} [{im.size[0]}px]", im), (f"{prompt} [SR {hi.size[0]}px]", hi)]
    return out


def grid(items: list[tuple[str, Image.Image]], cell: int = 192, cols: int | None = None) -> Image.Image:
    """Images in a grid, each captioned with its prompt underneath."""
    cols = cols or min(len(items), 4)
    rows = -(-len(items) // cols)
    caption_h = 40
    sheet = Image.new("RGB", (cols * cell, rows * (cell + caption_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, (caption, im) in enumerate(items):
        x, y = (k % cols) * cell, (k // cols) * (cell + caption_h)
        sheet.paste(im.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        wrapped = "\n".join(textwrap.wrap(caption, width=cell // 6)[:3])
        draw.multiline_text((x + 3, y + cell + 2), wrapped, fill="black", font=font, spacing=1)
    return sheet


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
