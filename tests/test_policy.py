from backend_mgmt import policy
from backend_mgmt.policy import RestartPolicy


def test_which_exits_are_restarted():
    assert policy.wants_restart(RestartPolicy(policy="on-failure"), failed=True)
    assert not policy.wants_restart(RestartPolicy(policy="on-failure"), failed=False)
    assert policy.wants_restart(RestartPolicy(policy="always"), failed=False)
    assert not policy.wants_restart(RestartPolicy(policy="no"), failed=True)


def test_backoff_doubles_up_to_the_maximum():
    rules = RestartPolicy(backoff_initial=0.5, backoff_max=3, max_restarts=10, window=100)
    delays = [policy.next_delay(rules, [0.0] * n, now=1.0) for n in range(5)]
    assert delays == [0.5, 1.0, 2.0, 3, 3]


def test_flapping_guard_counts_only_the_window():
    rules = RestartPolicy(max_restarts=3, window=10)
    assert policy.next_delay(rules, [1.0, 2.0, 3.0], now=5.0) is None
    assert policy.next_delay(rules, [1.0, 2.0, 3.0], now=11.5) is not None   # 1.0 fell out
    assert policy.next_delay(RestartPolicy(max_restarts=0), [], now=0.0) is None


def test_a_restart_exactly_window_seconds_ago_no_longer_counts():
    assert policy.recent([0.0, 5.0, 9.5], now=10.0, window=10.0) == [5.0, 9.5]
    rules = RestartPolicy(max_restarts=2, window=10, backoff_initial=1, backoff_max=60)
    assert policy.next_delay(rules, [0.0, 5.0], now=10.0) == 2.0     # only 5.0 counts
    assert policy.next_delay(rules, [0.5, 5.0], now=10.0) is None
