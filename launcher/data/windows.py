"""Windows of a long token sequence, for next-token prediction (character- or token-level language models)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class Windows(Dataset):
    """Item i is (tokens[s : s + block], tokens[s + 1 : s + block + 1]) with s = i * stride: a window of the
    sequence and the same window one token on, the targets of next-token prediction.

    stride 1 makes every position a window start: shuffled each epoch, a step sees `batch_size` random windows
    (nanoGPT's sampling, but without replacement and resumable). stride = block gives non-overlapping windows
    that cover the sequence once, for an exact validation loss. On the in-memory path the token tensor sits on
    the device and `gather` cuts a whole batch of windows there in one indexing operation.
    """

    def __init__(self, tokens: torch.Tensor, block: int, stride: int = 1) -> None:
        if tokens.dim() != 1 or len(tokens) < block + 1:
            raise ValueError(
                f"need a 1-d sequence of at least {block + 1} tokens, got shape {tuple(tokens.shape)}"
            )
        self.tokens, self.block, self.stride = tokens, block, stride
        self._offsets = torch.arange(block + 1, device=tokens.device)

    def __len__(self) -> int:
        return (len(self.tokens) - self.block - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.stride
        window = self.tokens[start : start + self.block + 1]
        return window[:-1], window[1:]

    def to(self, device: torch.device) -> Windows:
        return Windows(self.tokens.to(device), self.block, self.stride)

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        windows = self.tokens[(idx * self.stride)[:, None] + self._offsets]
        return windows[:, :-1], windows[:, 1:]
