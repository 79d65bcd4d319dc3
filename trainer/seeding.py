"""Seeds derived from names, identical in every process and every layout.

Expert e of layer l is initialised from `derived_seed(seed, l, "expert", e)`, never from the
rank, so a model initialises to the same numbers at any expert-parallel size.
"""

from __future__ import annotations

import hashlib

import torch


def derived_seed(*parts: int | str) -> int:
    """A 63-bit seed from (seed, layer, expert, ...), the same in every process and layout."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


_MIX1, _MIX2 = -4658895280553007687, -7723592293110705685  # splitmix64 constants as signed int64
_GOLDEN = -7046029254386353131


def _logical_shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)  # torch's >> on int64 is arithmetic


def mix64(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (int64 arithmetic wraps, as uint64 would)."""
    z = x.to(torch.int64) * _GOLDEN + (seed & ((1 << 62) - 1))
    z = (z ^ _logical_shift_right(z, 30)) * _MIX1
    z = (z ^ _logical_shift_right(z, 27)) * _MIX2
    return z ^ _logical_shift_right(z, 31)


def keyed_uniform(seed: int, keys: torch.Tensor) -> torch.Tensor:
    """A uniform number in (0, 1) for each int64 key: a pure function of (seed, key), so the
    same token gets the same noise whichever rank holds it (counter-based, like splitmix64)."""
    return (_logical_shift_right(mix64(keys, seed), 40).to(torch.float64) + 0.5) / float(1 << 24)
