"""``bench/run.py --quick`` works end to end: every process starts, every scenario and
baseline delivers every message, and the result has every field with a sane value.

No timing thresholds: this checks the measuring instrument, not the speed (figures on a
shared CI machine say little). The full bench and its figures: docs/performance.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {
    "uplink_mqtt": "gateway",
    "uplink_http": "gateway",
    "downlink_mqtt": "gateway",
    "downlink_smpp": "gateway_l3g",
    "baseline_rawpost": "sim",
    "baseline_pubsub": "mosquitto",
    "baseline_rawrelay": "rawrelay",
}
RUN_FIELDS = {
    "mode", "offered_rate", "sent", "delivered", "errors", "throughput", "p50_ms", "p90_ms",
    "p99_ms", "max_ms", "processes", "window_s", "loadavg_start", "loadavg_end",
}  # fmt: skip
PROC_FIELDS = {"cpu_s", "cpu_us_per_msg", "cpu_util", "peak_rss_mb", "rss_mb"}


def check_run(name: str, run: dict[str, Any], main_proc: str) -> None:
    assert run.keys() >= RUN_FIELDS, (name, RUN_FIELDS - run.keys())
    assert run["sent"] > 0
    assert run["errors"] == 0, (name, run["error_samples"])
    assert run["delivered"] == run["sent"], (name, run["delivered"], run["sent"])
    assert run["throughput"] > 0
    assert 0 < run["p50_ms"] <= run["p90_ms"] <= run["p99_ms"] <= run["max_ms"], (name, run)
    assert run["mode"] in ("open", "closed")
    assert (run["offered_rate"] is None) == (run["mode"] == "closed")
    for key in ("loadavg_start", "loadavg_end"):
        assert len(run[key]) == 3
        assert all(x >= 0 for x in run[key])
    proc = run["processes"][main_proc]
    assert proc.keys() >= PROC_FIELDS
    assert proc["peak_rss_mb"] >= proc["rss_mb"] > 0
    if main_proc == "mosquitto":
        # A few hundred messages cost mosquitto less than one clock tick (10 ms).
        assert proc["cpu_s"] >= 0
    else:
        assert proc["cpu_s"] > 0, (name, main_proc, proc)
        assert proc["cpu_us_per_msg"] > 0


def test_quick_bench_writes_every_field(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())

    assert result["mode"] == "quick"
    assert result["host"]["cpus"] >= 1
    assert {s["name"] for s in result["scenarios"]} == set(SCENARIOS)
    for scenario in result["scenarios"]:
        runs = scenario["runs"]
        assert [r["mode"] for r in runs] == ["closed"] + ["open"] * len(result["plan"]["rates"])
        assert [r["offered_rate"] for r in runs[1:]] == result["plan"]["rates"]
        for run in runs:
            check_run(scenario["name"], run, SCENARIOS[scenario["name"]])

    # READY=1 from NOTIFY_SOCKET for every gateway started (main, L3G, one per backlog).
    ready = result["ready_seconds"]
    assert {"gateway", "gateway_l3g"} <= ready.keys()
    assert all(0 < v < 60 for v in ready.values())

    backlog = {b["pending"]: b for b in result["backlog"]}
    assert set(backlog) == set(result["plan"]["backlogs"])
    for size, b in backlog.items():
        assert b["drain"]["complete"], b
        assert b["drain"]["drained"] == size
        assert b["fill"]["gateway_peak_rss_mb"] > 0
        if size:
            assert b["fill"]["stored"] == size
            assert b["drain"]["rate"] > 0
            assert b["drain"]["gateway_cpu_us_per_msg"] > 0
            assert b["fill"]["gateway_peak_rss_mb"] >= b["fill"]["gateway_rss_after_mb"] > 0

    table = (tmp_path / "result.md").read_text()
    for name in SCENARIOS:
        assert f"| {name} | closed |" in table
    assert "| pending |" in table
    if result["plot"] == "result.png":
        assert (tmp_path / "result.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:  # the bench extra is not installed: the result says so instead of a plot
        assert "matplotlib missing" in result["plot"]
        assert not (tmp_path / "result.png").exists()
