"""deploy/container/Containerfile, linted: podman installs here (Debian) but can neither
pull a base image (no registry beyond the package indexes) nor run a container
(crun may not set RLIMIT_NOFILE in this sandbox), so the build is documented
(docs/operations.md) and these checks keep the recipe honest: a non-root user, pinned
and fully qualified base images, exec-form entry point, sources that exist, extras
that exist, a health check on the admin listener of the example config.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", CONTAINERFILE.read_text())
    out = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def test_base_images_are_pinned_and_fully_qualified() -> None:
    images = [args.split()[0] for word, args in instructions() if word == "FROM"]
    assert images
    for image in images:
        assert re.fullmatch(r"[a-z0-9.-]+\.[a-z]+/[\w./-]+:[\w.-]+", image), image
        assert not image.endswith(":latest"), image


def test_runs_as_a_fixed_non_root_user() -> None:
    stage = final_stage()
    users = [args for word, args in stage if word == "USER"]
    assert users, "the final stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "a numeric uid: runtimes can check it is not root"
    assert int(uid) != 0
    user_at = max(i for i, (word, _) in enumerate(stage) if word == "USER")
    assert all(word != "RUN" for word, _ in stage[user_at:]), "nothing runs as root after USER"
    assert any(f"--uid {uid}" in args for word, args in stage if word == "RUN")


def test_entry_point_health_check_and_signal() -> None:
    stage = dict(final_stage())
    assert json.loads(stage["ENTRYPOINT"]) == ["gatewayd"]
    assert json.loads(stage["CMD"])[:1] == ["run"]
    assert stage["STOPSIGNAL"] == "SIGTERM"  # drains, as under systemd
    example = tomllib.loads((ROOT / "conf" / "gatewayd.example.toml").read_text())
    admin = example["metrics"]["listen"]
    assert f"http://{admin}/healthz" in stage["HEALTHCHECK"]
    assert "CREDENTIALS_DIRECTORY=/run/secrets" in stage["ENV"]
    port = example["api"]["listen"].rpartition(":")[2]
    assert stage["EXPOSE"].split() == [port]


def test_copied_sources_exist_and_extras_are_declared() -> None:
    for word, args in instructions():
        if word == "COPY" and not args.startswith("--from"):
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), source
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    installs = " ".join(args for word, args in instructions() if word == "RUN")
    (wanted,) = re.findall(r'"gatewayd\[([a-z0-9,]+)\]"', installs)
    for extra in wanted.split(","):
        assert extra in extras, extra
    ignored = (ROOT / ".containerignore").read_text().split()
    assert ".venv" in ignored
    assert "**/node_modules" in ignored
