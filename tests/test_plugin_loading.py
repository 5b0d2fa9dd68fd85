"""Loading plugins through pluggy: real distributions on sys.path, real entry points.

Each test writes a tiny installed distribution (a ``*.dist-info`` with an
``entry_points.txt``, as pip leaves it) and its module into a temp folder on sys.path.
"""

from __future__ import annotations

import itertools
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gatewayd import cli
from gatewayd.api import API_VERSION, Registry, TransportFactory, hookimpl
from gatewayd.errors import PluginError
from gatewayd.plugins import Plugins, api_compatible

_serial = itertools.count()
MakeDist = Callable[..., str]


@pytest.fixture
def make_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeDist]:
    """Install a one-module distribution with a ``gatewayd`` entry point; returns its
    entry-point name. Only these distributions are on the path the loader scans first,
    and autoload also finds the first-party plugins, as in production."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules: list[str] = []

    def make(body: str, *, dist: str | None = None) -> str:
        n = next(_serial)
        module = f"gwtest_plugin_{n}"
        name = f"probe{n}"
        dist = dist or f"gwtest-probe-{n}"
        (site / f"{module}.py").write_text(textwrap.dedent(body), encoding="utf-8")
        info = site / f"{dist.replace('-', '_')}-0.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3\n", encoding="utf-8"
        )
        (info / "entry_points.txt").write_text(f"[gatewayd]\n{name} = {module}\n", encoding="utf-8")
        modules.append(module)
        return name

    yield make
    for module in modules:
        sys.modules.pop(module, None)


GOOD = f"""
    from gatewayd.api import hookimpl
    GATEWAYD_API_VERSION = "{API_VERSION}"

    class Probe:
        pass

    @hookimpl
    def gatewayd_register_transports(registry):
        registry.add("probe", Probe)
"""


def test_an_entry_point_plugin_loads_with_its_distribution(make_dist: MakeDist) -> None:
    name = make_dist(GOOD, dist="gwtest-good")
    plugins = Plugins(autoload=True)
    assert plugins.transports.owner("probe") == name
    info = next(i for i in plugins.info() if i.name == name)
    assert (info.distribution, info.version, info.api_version) == ("gwtest-good", "0.3", "1.0")
    assert info.hooks == ("gatewayd_register_transports",)


class _NoArguments:
    """An implementation may take fewer arguments than its spec (pluggy's contract)."""

    called = False

    @hookimpl
    def gatewayd_register_transports(self) -> None:
        type(self).called = True


def test_an_implementation_with_fewer_arguments_is_called_by_pluggy() -> None:
    # Regression: registration called impl.function(registry=...) directly -> TypeError.
    Plugins(autoload=False, extra=(_NoArguments(),))
    assert _NoArguments.called


class _Wrapper:
    def __init__(self) -> None:
        self.seen: list[tuple[str, tuple[str, ...]]] = []

    @hookimpl(wrapper=True)
    def gatewayd_register_transports(self, registry: Registry[TransportFactory]) -> object:
        self.seen.append(("before", registry.names()))
        result = yield
        self.seen.append(("after", registry.names()))
        return result


class _Adds:
    @hookimpl
    def gatewayd_register_transports(self, registry: Registry[TransportFactory]) -> None:
        registry.add("adds", object)  # type: ignore[arg-type]


def test_a_wrapper_implementation_runs_around_the_registration() -> None:
    # Regression: a wrapper=True impl was called as a plain function, its generator
    # discarded: the wrapper silently never ran.
    wrapper = _Wrapper()
    plugins = Plugins(autoload=False, extra=(wrapper, _Adds()))
    assert wrapper.seen == [("before", ()), ("after", ("adds",))]
    assert plugins.transports.names() == ("adds",)


class _Raises:
    @hookimpl
    def gatewayd_register_transports(self, registry: Registry[TransportFactory]) -> None:
        raise RuntimeError("boom in register")


def test_a_hook_that_raises_is_a_plugin_error_naming_the_plugin() -> None:
    with pytest.raises(PluginError, match=r"failed in gatewayd_register_transports.*boom"):
        Plugins(autoload=False, extra=(_Raises(),))


def test_a_distribution_without_hooks_is_a_warning_naming_it(make_dist: MakeDist) -> None:
    name = make_dist(f'GATEWAYD_API_VERSION = "{API_VERSION}"\n', dist="gwtest-empty")
    with capture_logs() as logs:
        plugins = Plugins(autoload=True)
    warnings = [e for e in logs if e["event"] == "plugin.no_hooks"]
    assert warnings == [
        {
            "event": "plugin.no_hooks",
            "log_level": "warning",
            "plugin": name,
            "distribution": "gwtest-empty",
            "hint": "the entry-point module implements no gatewayd_* hook",
        }
    ]
    assert next(i for i in plugins.info() if i.name == name).hooks == ()


@pytest.mark.parametrize(
    ("declared", "error"),
    [
        ("2.0", r"written for plugin API 2\.0, this gatewayd offers 1\.0"),
        ("1.9", r"written for plugin API 1\.9"),
        ("one", r"GATEWAYD_API_VERSION = 'one' is not \"MAJOR\.MINOR\""),
    ],
)
def test_an_incompatible_api_version_is_refused_at_load(
    make_dist: MakeDist, declared: str, error: str
) -> None:
    name = make_dist(GOOD.replace(f'"{API_VERSION}"', f'"{declared}"'), dist="gwtest-old")
    with pytest.raises(PluginError, match=rf"plugin {name} \(gwtest-old\) is refused: {error}"):
        Plugins(autoload=True)


def test_a_missing_api_version_is_refused_naming_the_attribute(make_dist: MakeDist) -> None:
    make_dist(GOOD.replace(f'GATEWAYD_API_VERSION = "{API_VERSION}"', ""))
    with pytest.raises(PluginError, match=r"declares no plugin API version \(set GATEWAYD_API_V"):
        Plugins(autoload=True)


def test_api_compatibility_rule() -> None:
    assert api_compatible("1.0") is None
    assert api_compatible(API_VERSION) is None
    assert api_compatible("0.9") is not None
    assert api_compatible(1.0) is not None


def test_gatewayd_plugins_lists_broken_plugins_instead_of_failing(
    make_dist: MakeDist, capsys: pytest.CaptureFixture[str]
) -> None:
    broken_import = make_dist("import gwtest_no_such_module\n", dist="gwtest-import")
    too_new = make_dist(GOOD.replace(f'"{API_VERSION}"', '"1.7"'), dist="gwtest-new")
    good = make_dist(GOOD.replace('"probe"', '"probe-ok"'), dist="gwtest-fine")
    code = cli.main(["plugins"])
    out = capsys.readouterr().out
    assert code == 78
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "BROKEN: failed to import: ModuleNotFoundError" in lines[broken_import]
    assert "gwtest-import 0.3" in lines[broken_import]
    assert "BROKEN: written for plugin API 1.7" in lines[too_new]
    assert lines[good].split()[1:] == ["gwtest-fine", "0.3", "gatewayd_register_transports"]
    # the first-party plugins are still there
    assert "http" in lines
    assert "probe-ok" in out.split("transports:")[1]


def test_the_run_path_refuses_a_broken_plugin(make_dist: MakeDist) -> None:
    name = make_dist("raise RuntimeError('import-time crash')\n")
    with pytest.raises(PluginError, match=rf"plugin {name} .* failed to import: RuntimeError"):
        Plugins(autoload=True)
