"""``gatewayd queue`` against real store files, run as its own process next to a live store."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog

from gatewayd.errors import ExitCode
from gatewayd.queue_cli import add_parser
from gatewayd.store import Queue, SqliteStore, Store, StoreSettings

ROOT = Path(__file__).resolve().parents[1]


async def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a separate process, as an operator would next to the daemon."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gatewayd.queue_cli",
        "queue",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gatewayd")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["queue", *argv])


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    # Unconfigured structlog prints to stdout, which capsys would mix into the output
    # under test; the CLI process itself logs to stderr.
    with structlog.testing.capture_logs():
        yield


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture
async def live(db: Path) -> AsyncIterator[Store]:
    """The daemon's store, open while the CLI works on the same file."""
    store = await SqliteStore.open(StoreSettings(path=db))
    yield store
    await store.close()


async def fill(store: Store) -> list[int]:
    ids = []
    for n, queue in enumerate([Queue.UPLINK, Queue.UPLINK, Queue.DOWNLINK]):
        result = await store.put(
            queue, msg_id=f"msg-{n}", dedup_key=f"k{n}", lane=f"dev-{n}", body={"payload": f"p{n}"}
        )
        ids.append(result.id)
    await store.dead(ids[0], reason="permanent: 400 Bad Request")
    await store.dead(ids[2], reason="expired: exprTime passed")
    return ids


async def test_retry_from_another_process_reaches_the_live_store(live: Store, db: Path) -> None:
    ids = await fill(live)
    assert [i.id for i in await live.due(Queue.UPLINK, limit=10)] == [ids[1]]

    listed = await cli("list", "--db", str(db), "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["id"], r["msg_id"], r["state"]) for r in rows] == [
        (ids[0], "msg-0", "dead"),
        (ids[2], "msg-2", "dead"),
    ]
    assert "body" not in rows[0]

    retried = await cli("retry", str(ids[0]), "--db", str(db))
    assert retried.returncode == 0, retried.stderr
    assert "replayed 1" in retried.stdout

    # The live store sees the replay: same id, same msgId, attempts reset, and the
    # backlog counts it again (the CLI's commit is noticed through data_version).
    due = await live.due(Queue.UPLINK, limit=10)
    assert [(i.id, i.msg_id, i.attempts) for i in due] == [
        (ids[0], "msg-0", 0),
        (ids[1], "msg-1", 0),
    ]
    assert (await live.stats())["backlog"]["messages"] == 2


async def test_show_prints_the_body(live: Store, db: Path) -> None:
    ids = await fill(live)
    shown = await cli("show", str(ids[2]), "--db", str(db))
    assert shown.returncode == 0, shown.stderr
    assert '"payload": "p2"' in shown.stdout
    assert "expired: exprTime passed" in shown.stdout
    as_json = await cli("show", str(ids[2]), "--db", str(db), "--json")
    item = json.loads(as_json.stdout)
    assert (item["queue"], item["body"], item["state"]) == ("downlink", {"payload": "p2"}, "dead")
    missing = await cli("show", "999", "--db", str(db))
    assert missing.returncode == ExitCode.FAILURE
    assert "no message with id 999" in missing.stderr


async def test_list_table_and_filters(
    live: Store, db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = await fill(live)
    args = parse("list", "--db", str(db), "--state", "all", "--queue", "uplink")
    assert await asyncio.to_thread(args.func, args) == ExitCode.OK
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [
        "ID",
        "QUEUE",
        "KIND",
        "STATE",
        "MSG_ID",
        "DEVICE",
        "ATTEMPTS",
        "CREATED",
        "PREVIEW",
        "LAST_ERROR",
    ]
    assert [line.split()[:4] for line in out[1:]] == [
        [str(ids[0]), "uplink", "message", "dead"],
        [str(ids[1]), "uplink", "message", "pending"],
    ]
    assert "permanent: 400 Bad Request" in out[1]
    created = out[1].split()[7]
    assert dt.datetime.fromisoformat(created).tzinfo is not None  # ISO 8601, UTC
    assert out[1].split()[8] == "p0"  # the payload preview


async def test_retry_all_and_refusals(
    live: Store, db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = await fill(live)
    args = parse("retry", str(ids[1]), "--db", str(db))
    assert await asyncio.to_thread(args.func, args) == ExitCode.FAILURE
    assert "it is pending, not dead" in capsys.readouterr().err

    args = parse("retry", "--all", "--queue", "downlink", "--db", str(db), "--json")
    assert await asyncio.to_thread(args.func, args) == ExitCode.OK
    assert json.loads(capsys.readouterr().out) == {"replayed": [ids[2]]}
    args = parse("retry", "--all", "--db", str(db), "--json")
    assert await asyncio.to_thread(args.func, args) == ExitCode.OK
    assert json.loads(capsys.readouterr().out) == {"replayed": [ids[0]]}
    assert await live.list_items(queue=None, state="dead", limit=10) == []

    with pytest.raises(SystemExit):
        parse("retry", "--db", str(db))  # neither an id nor --all
    capsys.readouterr()


async def test_purge_needs_yes(live: Store, db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = await fill(live)
    args = parse("purge", "--db", str(db))
    assert await asyncio.to_thread(args.func, args) == ExitCode.USAGE
    assert "--yes" in capsys.readouterr().err
    assert len(await live.list_items(queue=None, state="dead", limit=10)) == 2

    args = parse("purge", "--db", str(db), "--older-than", "1h", "--yes")
    assert await asyncio.to_thread(args.func, args) == ExitCode.OK
    assert "purged 0 dead" in capsys.readouterr().out

    args = parse("purge", "--db", str(db), "--queue", "uplink", "--yes", "--json")
    assert await asyncio.to_thread(args.func, args) == ExitCode.OK
    assert json.loads(capsys.readouterr().out) == {"purged": 1}
    remaining = await live.list_items(queue=None, state=None, limit=10)
    assert [i.id for i in remaining] == ids[1:]


async def test_stats(live: Store, db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    await fill(live)
    args = parse("stats", "--db", str(db), "--json")
    assert await asyncio.to_thread(args.func, args) == ExitCode.OK
    stats = json.loads(capsys.readouterr().out)
    assert stats["queues"]["uplink"] == stats["queues"]["uplink"] | {"pending": 1, "dead": 1}
    assert stats["queues"]["downlink"]["dead"] == 1
    assert stats["backlog"] == stats["backlog"] | {"messages": 1}
    assert "max_messages" not in stats["backlog"]  # the daemon's limits are not known here

    args = parse("stats", "--db", str(db))
    assert await asyncio.to_thread(args.func, args) == ExitCode.OK
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["QUEUE", "PENDING", "DEAD", "DONE", "BYTES", "OLDEST"]
    assert table[1].split()[:4] == ["uplink", "1", "1", "0"]


async def test_json_on_stdout_only_kind_device_and_preview(
    live: Store, db: Path, tmp_path: Path
) -> None:
    """Through the ``gatewayd`` command: log lines (store.opened) go to stderr, stdout
    parses as JSON; the device comes from the config's mapping, times are ISO 8601."""
    await live.put(
        Queue.UPLINK,
        msg_id="m-up",
        dedup_key="up",
        lane="ue-sensor-1",
        body={"payload": "temperature=21.5 humidity=40", "msgId": "m-up"},
    )
    await live.put(
        Queue.DOWNLINK,
        msg_id="m-rep",
        dedup_key="rep",
        lane="ue-sensor-1",
        body={"kind": "report", "wire": {"msgId": "m-rep", "status": "REPT_DELY_SUCCESS"}},
    )
    await live.put_rejected(
        msg_id="m-bad",
        dedup_key="bad",
        lane="web:sensor-1",
        reason="not_json: expected a JSON object",
        body={"transport": "web", "device": "sensor-1", "content": "{not json"},
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gatewayd.cli",
        "queue",
        "list",
        "--db",
        str(db),
        "--state",
        "all",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    rows = {r["msg_id"]: r for r in json.loads(out)}
    assert rows["m-up"]["kind"] == "message"
    assert rows["m-up"]["preview"] == "temperature=21.5 humidity=40"
    assert rows["m-rep"]["kind"] == "report"
    assert rows["m-rep"]["preview"] == "REPT_DELY_SUCCESS"
    assert (rows["m-bad"]["kind"], rows["m-bad"]["preview"]) == ("rejected", "{not json")
    assert dt.datetime.fromisoformat(rows["m-up"]["created"]).tzinfo is not None

    config = tmp_path / "gw.toml"
    config.write_text(
        f'''[gateway]
id = "urn:gatewayd:gateway:t"
type = "N3G"
[northbound]
api_root = "https://127.0.0.1:9"
credentials = "nb"
server_identity = "localhost"
[api]
listen = "127.0.0.1:0"
[store]
path = "{db}"
[credentials.nb]
plugin = "x509"
[transports.web]
plugin = "http"
[[transports.web.devices]]
device = "sensor-1"
service_id = "ue-sensor-1"
'''
    )
    listed = await cli("list", "--config", str(config), "--state", "all", "--json")
    assert listed.returncode == 0, listed.stderr
    row = next(r for r in json.loads(listed.stdout) if r["msg_id"] == "m-up")
    assert (row["transport"], row["device"]) == ("web", "sensor-1")


async def test_an_item_on_a_sub_lane_shows_its_device(
    live: Store, db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A lane "service id|..." (a pipelined device's sub-lane, a segment set) shows the
    device of its service id."""
    await live.learn_device("web", "sensor-7", "ue-sensor-7")
    put = await live.put(
        Queue.UPLINK, msg_id="m-7", dedup_key="k7", lane="ue-sensor-7|3", body={"payload": "p"}
    )
    args = parse("list", "--db", str(db), "--state", "pending")
    assert await asyncio.to_thread(args.func, args) == ExitCode.OK
    (row,) = capsys.readouterr().out.splitlines()[1:]
    assert row.split()[4:6] == ["m-7", "web/sensor-7"]
    args = parse("show", str(put.id), "--db", str(db))
    assert await asyncio.to_thread(args.func, args) == ExitCode.OK
    shown = capsys.readouterr().out
    assert "device      web/sensor-7" in shown
    assert "lane        ue-sensor-7|3" in shown


async def test_missing_database_is_not_created(tmp_path: Path) -> None:
    db = tmp_path / "nowhere.db"
    result = await cli("stats", "--db", str(db))
    assert result.returncode == ExitCode.UNAVAILABLE
    assert "no store database" in result.stderr
    assert not db.exists()
    no_db = await cli("list")
    assert no_db.returncode == ExitCode.USAGE
    assert "--db" in no_db.stderr
