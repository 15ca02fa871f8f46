"""Shared fixtures: one test per send strategy this kernel runs, each with its manager."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from _streams import runnable_strategies

import trio_uring


@pytest.fixture(params=runnable_strategies())
def strategy(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def manager(strategy: str) -> AsyncIterator[trio_uring.IOManager]:
    async with trio_uring.open_manager(strategy=strategy) as m:
        yield m
