"""One spawn of 4 ranks serves every multi-rank test module (see helpers.run_parts)."""

import pytest

from dsinfra.testing import spawn
from tests.deep_ep.helpers import NUM_RANKS, run_parts


@pytest.fixture(scope="session")
def all_ranks() -> list[dict]:
    """Each rank's results, by part: ``all_ranks[rank]["intranode"]``."""
    return spawn(run_parts, NUM_RANKS, timeout=300)
