"""This rank's share of each global batch: windows of `seq_len + 1` tokens of one split.

Training sequences are consecutive windows of the split's token stream, visited in a seeded
random order per epoch. Which windows form global batch s depends only on (seed, s), and
rank r takes the r-th slice of it: every world size trains on the same data, and resuming at
step s needs no loader state but the number of windows consumed before it
(`TrainState.data_position`).
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

from ..seeding import derived_seed
from .corpus import DataError

Tokens = Union[np.ndarray, torch.Tensor]  # a memory-mapped shard, or any 1-D tensor of ids


class TokenBatches:
    """This rank's share of each global batch of (input, target) windows of `seq_len + 1` tokens."""

    def __init__(self, tokens: Tokens, seq_len: int, global_batch: int, rank: int, world_size: int,
                 seed: int, shuffle: bool, split_name: str):
        self.tokens, self.seq_len, self.seed, self.shuffle = tokens, seq_len, seed, shuffle
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(f"data.val_fraction: the {split_name} split has {len(tokens)} tokens, fewer than "
                            f"model.seq_len+1={seq_len + 1}")
        self.global_batch = global_batch
        per_rank = global_batch // world_size
        self.first, self.count = rank * per_rank, per_rank
        self._epoch, self._order = -1, None
        self._base_index = self._base_position = 0  # batch `index` starts at window position ...

    def continue_from(self, index: int, position: int) -> None:
        """Make global batch `index` start at window `position` (a resumed run, whatever batch size it had)."""
        self._base_index, self._base_position = index, position

    def _window_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(derived_seed(self.seed, "data", epoch))
                self._order = torch.randperm(self.num_windows, generator=gen)
            else:
                self._order = torch.arange(self.num_windows)
            self._epoch = epoch
        return self._order

    def _window(self, start: int) -> torch.Tensor:
        window = self.tokens[start:start + self.seq_len + 1]
        if isinstance(window, np.ndarray):  # a slice of the map: only these pages are read
            return torch.from_numpy(window.astype(np.int64))
        return window.long()

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets [per-rank batch, seq_len] (int64) of global batch number `index`."""
        rows = []
        for j in range(self.first, self.first + self.count):
            position = self._base_position + (index - self._base_index) * self.global_batch + j
            epoch, within = divmod(position, self.num_windows)
            start = int(self._window_order(epoch)[within]) * self.seq_len
            rows.append(self._window(start))
        window_BS1 = torch.stack(rows)
        return window_BS1[:, :-1], window_BS1[:, 1:]

    def position_of(self, index: int) -> int:
        """Windows consumed before global batch `index`."""
        return self._base_position + (index - self._base_index) * self.global_batch

    def epoch_of(self, index: int) -> float:
        return self.position_of(index) / self.num_windows
