"""The retry policy and the retry decision: pure functions, no clock."""

from __future__ import annotations

import pytest

from kqs.runner.retry import (
    MAX_DELAY,
    RetryPolicy,
    Verdict,
    decide,
    exhausted_before_run,
    retry_delay,
)


def mid() -> float:
    """A rand() that makes jitter zero."""
    return 0.5


def test_default_policy_is_25_attempts_over_about_three_weeks() -> None:
    policy = RetryPolicy()
    assert policy.max_attempts == 25
    total = sum(retry_delay(policy, n, rand=mid) for n in range(1, policy.max_attempts))
    assert 18 * 86400 < total < 25 * 86400


def test_exponential_doubles_from_base_up_to_the_cap() -> None:
    policy = RetryPolicy(base=2, cap=60, jitter=0)
    assert [retry_delay(policy, n, rand=mid) for n in range(1, 8)] == [2, 4, 8, 16, 32, 60, 60]


def test_exponential_with_a_factor() -> None:
    policy = RetryPolicy(base=1, factor=3, cap=1000, jitter=0)
    assert [retry_delay(policy, n) for n in range(1, 5)] == [1, 3, 9, 27]


def test_linear_and_constant() -> None:
    linear = RetryPolicy(backoff="linear", base=5, cap=12, jitter=0)
    assert [retry_delay(linear, n) for n in range(1, 5)] == [5, 10, 12, 12]
    constant = RetryPolicy(backoff="constant", base=7, cap=100, jitter=0)
    assert [retry_delay(constant, n) for n in range(1, 4)] == [7, 7, 7]


def test_jitter_spreads_within_its_fraction() -> None:
    policy = RetryPolicy(base=100, cap=1000, jitter=0.1)
    assert retry_delay(policy, 1, rand=lambda: 0.0) == 90
    assert retry_delay(policy, 1, rand=lambda: 0.999999) == 110
    assert retry_delay(policy, 1, rand=mid) == 100


def test_delays_are_whole_seconds_rounded_and_bounded() -> None:
    policy = RetryPolicy(base=0.4, cap=10, jitter=0)
    assert retry_delay(policy, 1) == 0
    assert retry_delay(policy, 2) == 1  # 0.8
    huge = RetryPolicy(base=1, cap=MAX_DELAY, jitter=0)
    assert retry_delay(huge, 200) == MAX_DELAY
    with pytest.raises(ValueError, match="attempt starts at 1"):
        retry_delay(policy, 0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_attempts": 0}, "max_attempts: must be an integer from 1"),
        ({"max_attempts": True}, "max_attempts"),
        ({"max_attempts": 2.5}, "max_attempts"),
        ({"backoff": "fibonacci"}, "backoff: must be one of exponential, linear, constant"),
        ({"base": -1}, "base: must be a number"),
        ({"base": float("nan")}, "base"),
        ({"factor": 0.5}, "factor"),
        ({"cap": 1, "base": 2}, "cap: must be at least base"),
        ({"jitter": 1.5}, "jitter"),
        ({"jitter": "0.1"}, "jitter"),
    ],
)
def test_policy_validates_itself(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**fields)  # type: ignore[arg-type]


def test_decide_done_and_dead() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert decide(policy, "done", 1) == Verdict("delete")
    assert decide(policy, "done", 99) == Verdict("delete")
    assert decide(policy, "dead", 1) == Verdict("bury")


def test_decide_retry_until_attempts_run_out() -> None:
    policy = RetryPolicy(max_attempts=3, base=1, cap=10, jitter=0)
    assert decide(policy, "retry", 1) == Verdict("release", delay=1)
    assert decide(policy, "retry", 2) == Verdict("release", delay=2)
    assert decide(policy, "retry", 3) == Verdict("bury", exhausted=True)
    assert decide(policy, "retry", 4) == Verdict("bury", exhausted=True)


def test_decide_uses_a_requested_delay_rounded_up_and_clamped() -> None:
    policy = RetryPolicy(max_attempts=5, base=100, cap=1000, jitter=0)
    assert decide(policy, "retry", 1, delay=0.2) == Verdict("release", delay=1)
    assert decide(policy, "retry", 1, delay=0) == Verdict("release", delay=0)
    assert decide(policy, "retry", 1, delay=-5) == Verdict("release", delay=0)
    assert decide(policy, "retry", 1, delay=float("inf")) == Verdict("release", delay=MAX_DELAY)
    assert decide(policy, "retry", 1, delay=1e20) == Verdict("release", delay=MAX_DELAY)
    # a requested delay does not buy an attempt beyond the policy
    assert decide(policy, "retry", 5, delay=1) == Verdict("bury", exhausted=True)


def test_a_job_reserved_beyond_its_attempts_runs_once_more_then_is_dead_without_running() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert not exhausted_before_run(policy, 3)
    # run 3's outcome was lost (say a done report never acknowledged): one more run
    assert not exhausted_before_run(policy, 4)
    assert exhausted_before_run(policy, 5)
    assert exhausted_before_run(RetryPolicy(max_attempts=1), 3)
    assert not exhausted_before_run(RetryPolicy(max_attempts=1), 2)
    # the extra run settles it: done is done, any failure is final
    assert decide(policy, "done", 4) == Verdict("delete")
    assert decide(policy, "retry", 4, delay=0) == Verdict("bury", exhausted=True)
    assert decide(policy, "dead", 4) == Verdict("bury")
