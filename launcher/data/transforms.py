"""Normalisation and augmentation of image batches, on the device.

Both data paths run them in batches: random crop with zero padding and horizontal flip, then normalisation.
Augmentation parameters are drawn once per epoch for every sample index from a generator seeded by (seed, epoch),
so a sample is augmented the same way whatever process, batch or resume it falls in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from launcher.config import DataConfig
from launcher.data.plan import mix_seed


class DeviceTransform:
    """Normalisation and augmentation of uint8 (or [0,1] float) image batches, on the device."""

    def __init__(self, cfg: DataConfig, seed: int, device: torch.device) -> None:
        self.seed, self.device = seed, device
        self.padding, self.hflip = cfg.crop_padding, cfg.hflip
        if cfg.mean:
            std = torch.tensor(cfg.std, device=device).view(1, -1, 1, 1)
            self.mean = torch.tensor(cfg.mean, device=device).view(1, -1, 1, 1)
            self.inv_std = 1.0 / std
        else:
            self.mean = self.inv_std = None
        self._aranges: dict[int, torch.Tensor] = {}

    @property
    def augments(self) -> bool:
        return self.padding > 0 or self.hflip

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.mean is not None:
            x = x.sub_(self.mean).mul_(self.inv_std)
        return x

    def epoch_params(self, num_samples: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Crop offsets (N, 2) and flip flags (N,) for every sample of the epoch."""
        if not self.augments:
            return None
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0xA0))
        offsets = torch.randint(0, 2 * self.padding + 1, (num_samples, 2), generator=g)
        flips = torch.rand(num_samples, generator=g) < 0.5
        return offsets.to(self.device), flips.to(self.device)

    def train(self, x: torch.Tensor, idx: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor] | None):
        if params is not None:
            offsets, flips = params
            if self.padding > 0:
                x = self._crop(x, offsets[idx])
            if self.hflip:
                x = torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(3), x)
        return self.normalize(x)

    def _arange(self, n: int) -> torch.Tensor:
        if n not in self._aranges:
            self._aranges[n] = torch.arange(n, device=self.device)
        return self._aranges[n]

    def _crop(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Zero-pad by `padding` and cut each image's window at its own offset: two gathers, no Python loop."""
        b, c, h, w = x.shape
        p = self.padding
        padded = F.pad(x, (p, p, p, p))
        rows = (offsets[:, 0:1] + self._arange(h)).view(b, 1, h, 1).expand(b, c, h, w + 2 * p)
        cols = (offsets[:, 1:2] + self._arange(w)).view(b, 1, 1, w).expand(b, c, h, w)
        return padded.gather(2, rows).gather(3, cols)
