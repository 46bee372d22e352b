"""Restart policy: whether an exit is restarted, after what backoff, and when to give up.

Pure functions of the configured policy, the exit and the times of recent restarts.
"""

from dataclasses import dataclass

NO = "no"
ON_FAILURE = "on-failure"
ALWAYS = "always"


@dataclass(frozen=True)
class RestartPolicy:
    policy: str = ON_FAILURE
    backoff_initial: float = 1.0     # seconds before the first restart...
    backoff_max: float = 60.0        # ...doubling with each restart in the window, up to this
    max_restarts: int = 5            # this many restarts within `window` seconds: give up
    window: float = 300.0


def wants_restart(policy, failed):
    """Does ``policy`` restart a backend that ended unasked (``failed``: not a clean exit)?"""
    if policy.policy == ALWAYS:
        return True
    return policy.policy == ON_FAILURE and failed


def recent(restart_times, now, window):
    return [t for t in restart_times if now - t < window]


def next_delay(policy, restart_times, now):
    """Seconds to wait before the next restart, or None when the flapping guard says stop."""
    count = len(recent(restart_times, now, policy.window))
    if count >= policy.max_restarts:
        return None
    return min(policy.backoff_initial * (2 ** count), policy.backoff_max)
