"""Training batches: instance images with their prompt, concatenated with class images and theirs.

Batch contents depend only on (seed, step, micro-step, rank), so a resumed run sees exactly the
batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> float tensor in [-1, 1], NCHW."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    # Large odd multipliers keep (step, micro, rank) combinations from colliding.
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 10_007 + micro * 101 + rank)


class DreamBoothData:
    """Pools of subject and class rows, each row stored once per flip variant.

    With `encode` (see engine.latent_encoder) the rows are VAE latent distributions computed here,
    once: a flipped image's latents are not its latents flipped, so both variants are encoded.
    """

    def __init__(self, instance: list[Image.Image], classes: list[Image.Image], random_flip: bool = True,
                 encode=None, row_cond: torch.Tensor | None = None, class_cond: torch.Tensor | None = None,
                 masks: torch.Tensor | None = None, captions: torch.Tensor | None = None):
        if not instance:
            raise ValueError("no instance images")
        self.random_flip = random_flip
        self.instance = self.pool(instance, random_flip, encode)
        self.classes = self.pool(classes, random_flip, encode) if classes else None
        # Per-row conditioning ([N, flip variants, ...], e.g. SDXL's time ids), picked with its row.
        self.row_cond, self.class_cond = row_cond, class_cond
        self.masks = masks  # [N, flip variants, 1, H, W] subject masks (mask_pool), picked with their row
        self.captions = captions  # [N, flip variants]: each photo's row in the prompt table (per-photo captions)

    @staticmethod
    def pool(images: list[Image.Image], random_flip: bool, encode=None) -> torch.Tensor:
        """[N, flip variants, ...]: the images' pixels, or what `encode` makes of them."""
        px = to_tensor(images)
        variants = [px, px.flip(-1)] if random_flip else [px]
        # Contiguous: a VAE's output on the CPU comes channels-last, which steers the denoiser's kernels
        # (another summation order) differently from the same pool read back from storage (encode.py).
        return torch.stack([encode(v) if encode else v for v in variants], dim=1).contiguous()

    @staticmethod
    def mask_pool(masks: list, random_flip: bool, size=None) -> torch.Tensor | None:
        """[N, flip variants, 1, h, w]: each photo's [H, W] mask (None: all subject), flipped with it and
        area-averaged to `size` (the latent grid, when known). None when no photo has a mask."""
        if all(m is None for m in masks):
            return None
        from .loss import to_grid

        shape = next(m for m in masks if m is not None).shape
        m = torch.stack([torch.ones(shape) if m is None else torch.as_tensor(m, dtype=torch.float32) for m in masks])
        m = to_grid(m[:, None], size or shape)
        return torch.stack([m, m.flip(-1)] if random_flip else [m], dim=1).contiguous()

    @classmethod
    def of_pools(cls, instance: torch.Tensor, classes: torch.Tensor | None, random_flip: bool,
                 row_cond: torch.Tensor | None = None, class_cond: torch.Tensor | None = None,
                 masks: torch.Tensor | None = None, captions: torch.Tensor | None = None) -> "DreamBoothData":
        """From pools made elsewhere (latents encoded off the training workers, see encode.py)."""
        self = cls.__new__(cls)
        self.random_flip, self.instance, self.classes = random_flip, instance, classes
        self.row_cond, self.class_cond, self.masks, self.captions = row_cond, class_cond, masks, captions
        return self

    @property
    def with_prior(self) -> bool:
        return self.classes is not None

    def _pick(self, pool: torch.Tensor, n: int, g: torch.Generator, *per_row: torch.Tensor | None):
        """n rows of `pool` (a random photo and flip each), and the same rows of each `per_row` pool."""
        idx = torch.randint(len(pool), (n,), generator=g)
        flip = (torch.rand(n, generator=g) < 0.5).long() if self.random_flip else torch.zeros(n, dtype=torch.long)
        return (pool[idx, flip], *(None if p is None else p[idx, flip] for p in per_row))

    @property
    def per_photo(self) -> bool:
        """Whether rows carry masks or captions (batch's `with_extras`)."""
        return getattr(self, "masks", None) is not None or getattr(self, "captions", None) is not None

    def batch(self, batch_size: int, g: torch.Generator, with_cond: bool = False, with_extras: bool = False):
        """(rows, n_instance): the first n_instance rows are the subject, the rest class images.
        `with_cond`: (rows, n_instance, per-row conditioning) (the same draws from `g`); `with_extras`:
        and last {"mask": the subject rows' masks, "caption": their prompt-table rows}, each None if absent."""
        x, c, m, cap = self._pick(self.instance, batch_size, g, self.row_cond, getattr(self, "masks", None),
                                  getattr(self, "captions", None))
        if self.with_prior:
            xc, cc = self._pick(self.classes, batch_size, g, self.class_cond)
            x = torch.cat([x, xc])
            c = None if c is None else torch.cat([c, cc])
        out = (x, batch_size, c) if with_cond else (x, batch_size)
        return (*out, {"mask": m, "caption": cap}) if with_extras else out
