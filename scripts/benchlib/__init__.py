"""The kqs benchmark harness (scripts/bench). See docs/performance.md."""
