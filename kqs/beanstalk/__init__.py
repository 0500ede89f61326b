"""beanstalkd from kqs's side: the protocol (`protocol`, sans-IO) and a pipelining
asyncio client (`client`). The names the rest of kqs uses are re-exported here."""

from kqs.beanstalk.client import BeanstalkClient
from kqs.beanstalk.protocol import (
    DEADLINE_SOON,
    DEFAULT_TUBE,
    BeanstalkError,
    BeanstalkUnavailable,
    BuriedError,
    DeadlineSoon,
    JobInfo,
    NotFoundError,
    PutItem,
    PutResult,
    PutStatus,
    ReservedJob,
    decode_server_stats,
)

__all__ = [
    "DEADLINE_SOON",
    "DEFAULT_TUBE",
    "BeanstalkClient",
    "BeanstalkError",
    "BeanstalkUnavailable",
    "BuriedError",
    "DeadlineSoon",
    "JobInfo",
    "NotFoundError",
    "PutItem",
    "PutResult",
    "PutStatus",
    "ReservedJob",
    "decode_server_stats",
]
