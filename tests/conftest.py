import os

import pytest
from hypothesis import HealthCheck, settings

# Example counts are set by the environment, as tiktoken's tests do: HYPOTHESIS_MAX_EXAMPLES=2000 for a soak.
settings.register_profile(
    "default",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("default")


@pytest.fixture
def one_torch_thread():
    """For files of tiny-tensor tests (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    torch's thread pool only adds contention on the shared CI machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
