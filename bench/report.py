"""The bench's outputs: result.json (everything), result.md (tables), result.png (plot)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _cpu(run: dict[str, Any], proc: str) -> str:
    p = run["processes"].get(proc)
    return f"{p['cpu_us_per_msg']:.0f}" if p else "-"


def markdown(result: dict[str, Any]) -> str:
    out = [
        f"# gatewayd bench ({result['mode']}, {result['started']})",
        "",
        f"{result['host']['cpus']} CPUs; load average at start {result['host']['loadavg_start']},"
        f" at end {result['host']['loadavg_end']}; {result['seconds']} s in all.",
        "",
        "Start to READY=1 (s): "
        + ", ".join(f"{k} {v}" for k, v in sorted(result.get("ready_seconds", {}).items())),
        "",
        "CPU columns: µs of CPU per delivered message for each process (utime+stime over the"
        " run / messages delivered); `gw` is the gateway (N3G, or L3G for SMPP); `gw txn/msg`"
        " its store transactions (writer round trips) per message.",
        "",
        "| scenario | mode | offered/s | sent | delivered | msg/s | p50 ms | p99 ms | max ms"
        " | gw µs/msg | gw txn/msg | sim µs/msg | broker µs/msg | other µs/msg | gw peak RSS MB"
        " | load start→end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sc in result["scenarios"]:
        for r in sc["runs"]:
            procs = r["processes"]
            gw = "gateway" if "gateway" in procs else "gateway_l3g"
            other = next((n for n in ("rawrelay", "smsc") if n in procs), None)
            peak = procs[gw]["peak_rss_mb"] if gw in procs else "-"
            out.append(
                f"| {sc['name']} | {r['mode']} | {r['offered_rate'] or 'max'} | {r['sent']}"
                f" | {r['delivered']} | {r['throughput']:.0f} | {r['p50_ms']:.1f}"
                f" | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | {_cpu(r, gw)}"
                f" | {r.get('gateway_txn_per_msg', '-')} | {_cpu(r, 'sim')}"
                f" | {_cpu(r, 'mosquitto')} | {(other + ' ' + _cpu(r, other)) if other else '-'}"
                f" | {peak} | {r['loadavg_start'][0]:.2f}→{r['loadavg_end'][0]:.2f} |"
            )
    if result["backlog"]:
        out += [
            "",
            "Backlog: uplinks stored over MQTT 5 with the server stopped (fresh gateway), then"
            " the server started and the drain measured.",
            "",
            "| pending | fill msg/s | fill gw µs/msg | gw peak RSS during fill MB"
            " | RSS after fill MB | drained | drain s | drain msg/s | drain gw µs/msg"
            " | load start→end |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for b in result["backlog"]:
            f, d = b["fill"], b["drain"]
            out.append(
                f"| {b['pending']} | {f.get('rate', '-')} | {f.get('gateway_cpu_us_per_msg', '-')}"
                f" | {f.get('gateway_peak_rss_mb', '-')} | {f.get('gateway_rss_after_mb', '-')}"
                f" | {d['drained']}{'' if d['complete'] else ' (incomplete)'} | {d['seconds']}"
                f" | {d['rate']} | {d['gateway_cpu_us_per_msg']}"
                f" | {b['loadavg_start'][0]:.2f}→{b['loadavg_end'][0]:.2f} |"
            )
    return "\n".join(out) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(13, 5))
    for sc in result["scenarios"]:
        runs = [r for r in sc["runs"] if r["mode"] == "open"]
        if not runs:
            continue
        x = [r["offered_rate"] for r in runs]
        line = ax_t.plot(x, [r["throughput"] for r in runs], marker="o", label=sc["name"])[0]
        ax_l.plot(x, [r["p50_ms"] for r in runs], marker="o", ls="--", color=line.get_color())
        ax_l.plot(
            x, [r["p99_ms"] for r in runs], marker="s", color=line.get_color(), label=sc["name"]
        )
    ax_t.plot(
        [0, max(result["plan"]["rates"])],
        [0, max(result["plan"]["rates"])],
        ":",
        color="grey",
        label="offered",
    )
    ax_t.set(xlabel="offered load (msg/s, open loop)", ylabel="delivered msg/s", title="throughput")
    ax_l.set(
        xlabel="offered load (msg/s, open loop)",
        ylabel="latency ms (log)",
        title="p50 (dashed) and p99 (solid)",
        yscale="log",
    )
    for ax in (ax_t, ax_l):
        if ax.get_legend_handles_labels()[0]:  # none in a backlog-only run
            ax.legend(fontsize=7)
    fig.suptitle(f"gatewayd bench {result['mode']} {result['started']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict[str, Any], out: Path) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        # Said in the result rather than failing the run: the figures are still good.
        result["plot"] = "not written: matplotlib missing (pip install -e '.[bench]')"
    else:
        plot(result, out / "result.png")
        result["plot"] = "result.png"
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "result.md").write_text(markdown(result))
