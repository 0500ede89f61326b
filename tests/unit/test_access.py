from __future__ import annotations

import pytest

from kqs.rpc.methods import Access, Level


@pytest.mark.parametrize(
    ("access", "initial"),
    [
        (Access(), Level.ADMIN),
        (Access(token="t" * 16), Level.NONE),
        (Access(admin_token="a" * 16), Level.USER),
        (Access(token="t" * 16, admin_token="a" * 16), Level.NONE),
    ],
)
def test_initial_level(access: Access, initial: Level) -> None:
    assert access.initial() == initial


def test_tokens_grant_their_level() -> None:
    both = Access(token="t" * 16, admin_token="a" * 16)
    assert both.level_of("t" * 16) == Level.USER
    assert both.level_of("a" * 16) == Level.ADMIN
    assert both.level_of("x" * 16) == Level.NONE
    assert both.level_of("") == Level.NONE
    assert Access(token="t" * 16).level_of("t" * 16) == Level.ADMIN  # the only token is admin
