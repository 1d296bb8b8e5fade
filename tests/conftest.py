import os

from hypothesis import HealthCheck, settings

# Example counts are set by the environment, as tiktoken's tests do: HYPOTHESIS_MAX_EXAMPLES=2000 for a soak.
settings.register_profile(
    "default",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("default")
