"""Seeds derived from names, identical in every process and every layout.

Expert e of layer l is initialised from `derived_seed(seed, l, "expert", e)`, never from the
rank, so a model initialises to the same numbers at any expert-parallel size.
"""

from __future__ import annotations

import hashlib


def derived_seed(*parts: int | str) -> int:
    """A 63-bit seed from (seed, layer, expert, ...), the same in every process and layout."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
