"""kqs: a durable job queueing service."""

__version__ = "0.1.0"
