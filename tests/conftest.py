"""Shared pytest set-up: a hypothesis profile suited to CI on two cores."""

from hypothesis import HealthCheck, settings

# Cascade strategies build whole programs per example: slower than hypothesis expects,
# and timing-based deadlines flake under pytest-xdist.
settings.register_profile(
    "einfuse", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("einfuse")
