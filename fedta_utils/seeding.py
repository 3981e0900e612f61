"""One run seed, many independent random streams.

Every random choice in a run (data split, shards, client sampling, batch
order, augmentation, label sampling for the Fisher, head initialisation) draws
from a stream derived from (run seed, purpose, round, client, ...). Streams are
recomputed from their tags rather than carried along, so a resumed run draws
exactly what the killed run would have drawn, and two runs that share a seed
share e.g. the clients sampled in every round (paired comparisons).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def _tag_to_int(tag: int | str) -> int:
    if isinstance(tag, str):
        return zlib.crc32(tag.encode("utf-8"))
    if tag < 0:
        raise ValueError(f"seed tags must be non-negative, got {tag}")
    return int(tag)


def derive_seed(seed: int, *tags: int | str) -> int:
    """A 63-bit seed for the stream named by `tags` under the run `seed`."""
    entropy = [_tag_to_int(seed), *(_tag_to_int(t) for t in tags)]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))  # torch.Generator.manual_seed wants < 2**63


def numpy_rng(seed: int, *tags: int | str) -> np.random.Generator:
    """A numpy Generator for the stream (seed, *tags)."""
    return np.random.default_rng(derive_seed(seed, *tags))


def torch_generator(seed: int, *tags: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` for the stream (seed, *tags)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, *tags))
    return generator
