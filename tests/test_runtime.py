"""gatewayd.runtime: the event loop switch and the heap freeze after READY."""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Iterator

import pytest
import uvloop  # the test extra installs it, as the speed extra does in production

from gatewayd import runtime
from gatewayd.errors import ConfigError


@pytest.fixture
def gc_state() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_auto_runs_on_uvloop_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(runtime.LOOP_SWITCH, raising=False)
    name, factory = runtime.loop_factory()
    assert (name, factory) == ("uvloop", uvloop.new_event_loop)
    with asyncio.Runner(loop_factory=factory) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)


def test_without_uvloop_auto_runs_on_the_stock_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(runtime.LOOP_SWITCH, raising=False)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # not installed
    assert runtime.loop_factory() == ("asyncio", None)


def test_the_switch_keeps_the_stock_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(runtime.LOOP_SWITCH, "asyncio")
    assert runtime.loop_factory() == ("asyncio", None)


def test_a_wrong_switch_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(runtime.LOOP_SWITCH, "trio")
    with pytest.raises(ConfigError, match="GATEWAYD_EVENT_LOOP: 'trio'"):
        runtime.loop_factory()


def test_insisting_on_uvloop_without_it_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(runtime.LOOP_SWITCH, "uvloop")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import fails
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        runtime.loop_factory()


@pytest.mark.usefixtures("gc_state")
def test_freeze_moves_the_heap_out_of_the_collectors_way() -> None:
    runtime.freeze_heap()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == runtime.GEN0_THRESHOLD
