"""Every input ``./run fuzz`` ever saved (``tests/data/fuzz/<target>/``) must now pass its target.

Also runs each target over its seeds and a short hypothesis sweep, so a target that itself
broke (an import, a renamed function) fails here rather than only under ``./run fuzz``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzz import SEEDS
from fuzz_targets import TARGETS
from hypothesis import given, settings
from hypothesis import strategies as st

SAVED = Path(__file__).parent / "data" / "fuzz"


def saved_inputs() -> list[tuple[str, Path]]:
    return (
        sorted(
            (target.name, path)
            for target in SAVED.iterdir()
            if target.is_dir()
            for path in target.iterdir()
            if path.is_file()
        )
        if SAVED.is_dir()
        else []
    )


@pytest.mark.parametrize(("target", "path"), saved_inputs(), ids=lambda v: getattr(v, "name", v))
def test_saved_inputs_no_longer_crash(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_targets_accept_their_seeds(target: str) -> None:
    for seed in SEEDS[target]:
        TARGETS[target](seed)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_targets_survive_random_bytes(target: str) -> None:
    @settings(max_examples=150, deadline=None, database=None)
    @given(st.binary(max_size=512))
    def check(data: bytes) -> None:
        TARGETS[target](data)

    check()
