import pytest


@pytest.fixture(autouse=True)
def _e2e_stack(livekit, web, worker, beat):
    """Every end-to-end test runs against the whole stack: LiveKit, web, worker and beat."""
