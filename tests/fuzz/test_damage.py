"""The damage helper itself: every damage changes the bytes, and truncation shortens them."""

from __future__ import annotations

from hypothesis import given

from tests.fuzz.damage import damages, fuzz_settings


@fuzz_settings()
@given(damage=damages())
def test_every_damage_changes_the_bytes(damage):
    data = bytes(range(256)) * 8
    damaged = damage.apply(data)
    assert damaged != data
    if damage.kind == "truncate":
        assert len(damaged) < len(data)
    else:
        assert len(damaged) == len(data)
