"""Hypothesis profiles of the stateful lifecycle test (tests/integration/test_lifecycle_stateful.py).

- "lifecycle" (used by default by that test): bounded for a 2-core machine, about a minute.
- "long": many more examples and longer step sequences, for a soak run:

      .venv/bin/pytest tests/integration/test_lifecycle_stateful.py --hypothesis-profile=long \
          -p tests.integration.conftest_hypothesis

  `--hypothesis-profile` is read when pytest configures itself, before test modules are
  imported, so the profile must be registered by then: either with `-p` as above, or by
  importing this module from tests/conftest.py (`import tests.integration.conftest_hypothesis`).
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

_SLOW_AND_STATEFUL = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "lifecycle", max_examples=40, stateful_step_count=30, deadline=None,
    suppress_health_check=_SLOW_AND_STATEFUL,
)
settings.register_profile(
    "long", max_examples=400, stateful_step_count=60, deadline=None,
    suppress_health_check=_SLOW_AND_STATEFUL,
)

# The profile names that ask for the long run (the pytest plugin derives
# "long-with-verbose-verbosity" and the like from the one given).
LONG_PREFIX = "long"


def lifecycle_settings() -> settings:
    """The long profile when it was loaded (--hypothesis-profile=long), else the bounded one.
    Either keeps what the loaded profile says about verbosity, seed printing and the database."""
    current = settings.get_current_profile_name()
    if current == LONG_PREFIX or current.startswith(LONG_PREFIX + "-with-"):
        return settings(settings.default, deadline=None, suppress_health_check=_SLOW_AND_STATEFUL)
    bounded = settings.get_profile("lifecycle")
    return settings(
        settings.default, max_examples=bounded.max_examples, stateful_step_count=bounded.stateful_step_count,
        deadline=None, suppress_health_check=_SLOW_AND_STATEFUL,
    )


def is_long() -> bool:
    current = settings.get_current_profile_name()
    return current == LONG_PREFIX or current.startswith(LONG_PREFIX + "-with-")
