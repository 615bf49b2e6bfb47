"""The random streams of training: every random draw comes from ``(seed, purpose, keys...)``, one purpose
number per kind of draw, so that a run is a pure function of its seed (any number of workers, a resumed run).
"""

from __future__ import annotations

import numpy as np

#: The purposes: the epoch's list of members, the pair inside a member, its augmentation, the GradICON sample
#: points of a step, the DataLoader's generator, network initialisation, synthetic images.
PURPOSE_EPOCH, PURPOSE_PAIR, PURPOSE_AUGMENT, PURPOSE_POINTS, PURPOSE_LOADER, PURPOSE_INIT, PURPOSE_SYNTHESIS = range(7)


def random_stream(seed: int, purpose: int, *keys: int) -> np.random.Generator:
    """A numpy generator that depends only on its arguments."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(purpose), *map(int, keys)]))


def derived_seed(seed: int, purpose: int, *keys: int) -> int:
    """A 63-bit seed that depends only on its arguments (for torch generators)."""
    state = np.random.SeedSequence([int(seed), int(purpose), *map(int, keys)]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1] >> 1)


__all__ = ["PURPOSE_AUGMENT", "PURPOSE_EPOCH", "PURPOSE_INIT", "PURPOSE_LOADER", "PURPOSE_PAIR", "PURPOSE_POINTS",
           "PURPOSE_SYNTHESIS", "derived_seed", "random_stream"]
