"""One spawn of 4 ranks serves every multi-rank test module (see helpers.run_parts)."""

import pytest

from dsinfra.deep_ep import reference
from dsinfra.testing import spawn
from tests.deep_ep.helpers import NUM_RANKS, WORLD_EXPERTS, all_inputs, run_parts


@pytest.fixture(scope="session")
def all_ranks() -> list[dict]:
    """Each rank's results, by part: ``all_ranks[rank]["intranode"]``."""
    return spawn(run_parts, NUM_RANKS, timeout=300)


@pytest.fixture(scope="session")
def expected() -> dict:
    """The world's inputs (``WORLD_EXPERTS`` experts) and the reference dispatch of them."""
    xs, idxs, weights = all_inputs(range(NUM_RANKS), WORLD_EXPERTS)
    return {"inputs": (xs, idxs, weights), "dispatch": reference.dispatch(xs, idxs, weights, WORLD_EXPERTS)}
