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
    def __init__(self, instance: list[Image.Image], classes: list[Image.Image], random_flip: bool = True):
        if not instance:
            raise ValueError("no instance images")
        self.instance = to_tensor(instance)
        self.classes = to_tensor(classes) if classes else None
        self.random_flip = random_flip

    @property
    def with_prior(self) -> bool:
        return self.classes is not None

    def _pick(self, pool: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
        x = pool[torch.randint(len(pool), (n,), generator=g)]
        if self.random_flip:
            flip = torch.rand(n, generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    def batch(self, batch_size: int, g: torch.Generator) -> tuple[torch.Tensor, int]:
        """(pixels, n_instance): the first n_instance rows are the subject, the rest class images."""
        x = self._pick(self.instance, batch_size, g)
        if self.with_prior:
            x = torch.cat([x, self._pick(self.classes, batch_size, g)])
        return x, batch_size
