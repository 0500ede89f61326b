"""kqs runners: reserve jobs from beanstalkd, run the handler of their type, retry
failures with backoff, declare jobs dead when their attempts run out (docs/runner.md).

What handlers use: `JobContext` (the job), `Retry` (fail, retry), `Fail`/`Dead` (fail, do
not retry). `RetryPolicy` is the per-type retry value.
"""

from kqs.runner.handlers import JobContext
from kqs.runner.outcome import Dead, Fail, Retry
from kqs.runner.retry import RetryPolicy

__all__ = ["Dead", "Fail", "JobContext", "Retry", "RetryPolicy"]
