"""The wire: newline-delimited JSON over TCP (see docs/protocol.md)."""
