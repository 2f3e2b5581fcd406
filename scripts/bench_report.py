#!/usr/bin/env python3
"""The report of scripts/bench.sh, with the Python standard library only.

Subcommands:
  meta    print the machine and configuration of a run as JSON (or update such a file)
  record  print one run of sfc-bench (its arguments, exit status, time and JSON) as a JSON line
  report  write the generated block of docs/BENCHMARKS.md and the SVG plots from the results
"""

import argparse
import datetime
import glob
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from xml.sax.saxutils import escape

BEGIN = "<!-- bench.sh: begin -->"
END = "<!-- bench.sh: end -->"

# Issue 4's targets: (what, how to find the run, the figure, comparison, bound, unit).
TARGETS = [
    ("relay, 1,000 pairs, full speed", {"scenario": "relay", "clients": 1000}, "throughput", ">=", 70_000, "msg/s"),
    ("relay, 100 pairs, full speed", {"scenario": "relay", "clients": 100}, "throughput", ">=", 120_000, "msg/s"),
    ("relay, 100 pairs at 5,000 msg/s: p50", {"scenario": "relay", "clients": 100, "rate": 5000}, "p50", "<=", 100, "us"),
    ("relay, 100 pairs at 5,000 msg/s: p99", {"scenario": "relay", "clients": 100, "rate": 5000}, "p99", "<=", 150, "us"),
    ("relay, 100 pairs at 5,000 msg/s: p99.9", {"scenario": "relay", "clients": 100, "rate": 5000}, "p999", "<=", 1500, "us"),
    ("idle connections: server RSS per connection", {"scenario": "connections"}, "rss_per_connection", "<=", 10_000, "B"),
    ("full handshakes", {"scenario": "handshake"}, "throughput", ">=", 4000, "/s"),
    ("offline drain to one client", {"scenario": "offline"}, "throughput", ">=", 200_000, "msg/s"),
    ("password logins", {"scenario": "login"}, "throughput", ">=", 170, "/s"),
]

# Targets read from the micro benchmarks: (what, benchmark name prefix, comparison, bound, unit).
# `store/append/sync/AxPxBB` appends A×P messages of B bytes per round from A concurrent tasks.
MICRO_TARGETS = [
    ("durable inbox writes, group commit (micro: `store/append/sync/`)", "store/append/sync/", ">=", 300_000, "msg/s"),
]

# Points of the plots, colour-blind safe (Okabe-Ito).
COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00"]


# ---------------------------------------------------------------------------------------------
# meta and record


def command_output(*argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine():
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    ram = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    commit = command_output("git", "rev-parse", "--short=12", "HEAD")
    dirty = command_output("git", "status", "--porcelain", "--untracked-files=no")
    return {
        "cores": os.cpu_count(),
        "cpu": cpu or platform.processor() or platform.machine(),
        "ram_bytes": ram,
        "kernel": f"{platform.system()} {platform.release()}",
        "rustc": command_output("rustc", "--version"),
        "commit": commit,
        "dirty": bool(dirty),
    }


def parse_config(pairs):
    config = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        config[key] = value
    return config


def cmd_meta(args):
    if args.update:
        with open(args.update) as f:
            meta = json.load(f)
        meta["config"].update(parse_config(args.config))
    else:
        now = datetime.datetime.now(datetime.timezone.utc)
        meta = {
            "date": now.strftime("%Y-%m-%d %H:%M UTC"),
            "quick": args.quick == "1",
            "config": parse_config(args.config),
            "machine": machine(),
        }
    json.dump(meta, sys.stdout, indent=1)
    print()


def parse_bench_args(argv):
    """sfc-bench's arguments as a dict: the scenario, then each --flag's value (or True)."""
    params = {"scenario": argv[0] if argv else None}
    i = 1
    while i < len(argv):
        flag = argv[i]
        if flag.startswith("--"):
            key = flag[2:]
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
                try:
                    value = int(value)
                except ValueError:
                    try:
                        value = float(value)
                    except ValueError:
                        pass
                params[key] = value
            else:
                params[key] = True
        i += 1
    params.setdefault("durability", "sync")
    return params


def cmd_record(args):
    result, error = None, None
    try:
        with open(args.stdout) as f:
            text = f.read().strip()
        result = json.loads(text) if text else None
    except (OSError, ValueError) as e:
        error = f"unreadable output: {e}"
    if args.exit != 0:
        error = f"exit status {args.exit}" + (" (timed out)" if args.exit == 124 else "")
    elif result is None and error is None:
        error = "no output"
    record = {
        "label": args.label,
        "command": "sfc-bench " + shlex.join(args.argv),
        "params": parse_bench_args(args.argv),
        "wall_s": round(args.end - args.start, 2),
        "attempts": args.attempts,
        "error": error,
        "result": result,
    }
    print(json.dumps(record))


# ---------------------------------------------------------------------------------------------
# formatting


def thousands(x):
    return f"{x:,.0f}"


def fmt_us(us):
    if us is None:
        return "–"
    if us < 1000:
        return f"{us:.0f} µs"
    if us < 10_000:
        return f"{us / 1000:.2f} ms"
    if us < 1_000_000:
        return f"{us / 1000:.1f} ms"
    return f"{us / 1e6:.2f} s"


def fmt_bytes(b):
    if b is None:
        return "–"
    if b < 10_000:
        return f"{b:,} B"
    if b < 10 * 1024 * 1024:
        return f"{b / 1000:.1f} KB"
    return f"{b / (1024 * 1024):.1f} MiB"


def fmt_duration(s):
    s = int(round(s))
    return f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


def fmt_time_ns(ns):
    for unit, scale in (("ns", 1), ("µs", 1e3), ("ms", 1e6), ("s", 1e9)):
        if ns < scale * 1000 or unit == "s":
            value = ns / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{ns} ns"


# ---------------------------------------------------------------------------------------------
# figures


def latency(run, key):
    """A latency figure of a run, or None where it measured none (offline drain)."""
    result = run.get("result") or {}
    lat = result.get("latency_us") or {}
    if not lat.get("max"):
        return None
    return lat.get(key)


def figure(run, key):
    result = run.get("result")
    if not result or run.get("error"):
        return None
    if key == "throughput":
        return result.get("throughput_per_s")
    if key == "rss_per_connection":
        return result.get("server_rss_per_connection_bytes")
    return latency(run, key)


def median(values):
    values = sorted(values)
    n = len(values)
    if n == 0:
        return None
    mid = n // 2
    return values[mid] if n % 2 else (values[mid - 1] + values[mid]) / 2


# Figures of a result replaced by their median over the rounds (integers stay integers).
MEDIAN_KEYS = (
    "throughput_per_s",
    "server_cpu_s",
    "server_peak_rss_bytes",
    "server_rss_per_connection_bytes",
    "machine_busy_pct",
    "machine_steal_pct",
)
LATENCY_KEYS = ("p50", "p90", "p99", "p999", "max")
# Counts that must be 0, summed over the rounds so that one bad round shows.
SUMMED_KEYS = ("lost", "duplicates", "errors")


def combine_rounds(runs):
    """One run per label: with several rounds of a label, a run whose figures are the medians
    over its successful rounds (the representative round, for the latency distribution of the
    plots, is the one with the median p99 in open loop and the median throughput otherwise),
    lost, duplicates and errors summed over all rounds, and the rounds' ranges kept for the
    notes. Labels keep the order of their first round."""
    groups = {}
    for run in runs:
        groups.setdefault(run["label"], []).append(run)
    combined = []
    for label, group in groups.items():
        if len(group) == 1:
            combined.append(group[0])
            continue
        ok = [r for r in group if not r.get("error") and r.get("result")]
        if not ok:
            merged = dict(group[-1])
        else:
            by_rate = ok[0]["params"].get("rate") is not None
            key = (lambda r: r["result"]["latency_us"]["p99"]) if by_rate else (
                lambda r: r["result"]["throughput_per_s"]
            )
            ranked = sorted(ok, key=key)
            merged = dict(ranked[(len(ranked) - 1) // 2])
            result = dict(merged["result"])
            for k in MEDIAN_KEYS:
                values = [r["result"].get(k) for r in ok if r["result"].get(k) is not None]
                if values:
                    m = median(values)
                    result[k] = round(m) if all(isinstance(v, int) for v in values) else m
            latency_us = dict(result.get("latency_us") or {})
            for k in LATENCY_KEYS:
                values = [r["result"]["latency_us"][k] for r in ok if "latency_us" in r["result"]]
                if values:
                    latency_us[k] = round(median(values))
            result["latency_us"] = latency_us
            for k in SUMMED_KEYS:
                result[k] = sum(r["result"].get(k, 0) for r in ok)
            merged["result"] = result
            merged["ranges"] = {
                "throughput": [r["result"]["throughput_per_s"] for r in ok],
                "p99": [r["result"]["latency_us"]["p99"] for r in ok],
            }
        merged["rounds"] = len(group)
        merged["failed_rounds"] = len(group) - len(ok)
        merged["wall_s"] = sum(r.get("wall_s", 0) for r in group)
        merged["attempts"] = max(r.get("attempts", 1) for r in group)
        combined.append(merged)
    return combined


def matches(run, want):
    params = run["params"]
    for key, value in want.items():
        if params.get(key) != value:
            return False
    # Full speed unless the target names a rate; one device per user unless it names devices;
    # sync durability always.
    if "rate" not in want and params.get("rate") is not None:
        return False
    if "devices" not in want and params.get("devices", 1) != 1:
        return False
    return params.get("durability") == "sync"


def fmt_figure(value, unit):
    if value is None:
        return "–"
    if unit == "us":
        return fmt_us(value)
    if unit == "B":
        return fmt_bytes(value)
    return f"{thousands(value)}{'' if unit.startswith('/') else ' '}{unit}"


def micro_rate(micro, prefix):
    """Messages per second of the fastest micro benchmark named `prefix` + `AxPxBB` (the
    store benchmark runs with 64 and with 512 appenders in flight)."""
    best = None
    for name, median, _, _, _ in micro:
        if not name.startswith(prefix) or not median:
            continue
        shape = name[len(prefix):].split("x")
        try:
            rate = int(shape[0]) * int(shape[1]) / (median / 1e9)
        except (IndexError, ValueError):
            continue
        best = rate if best is None else max(best, rate)
    return best


def verdict_cell(value, op, bound, measured):
    if not measured:
        return "not measured"
    if value is None:
        return "failed run"
    met = value >= bound if op == ">=" else value <= bound
    return "**met**" if met else "not met"


def targets_table(runs, micro):
    lines = [
        "| target (issue 4) | goal | measured | |",
        "| --- | --- | --- | --- |",
    ]
    for what, want, key, op, bound, unit in TARGETS:
        found = [r for r in runs if matches(r, want)]
        value = figure(found[-1], key) if found else None
        verdict = verdict_cell(value, op, bound, bool(found))
        sign = "≥" if op == ">=" else "≤"
        lines.append(f"| {what} | {sign} {fmt_figure(bound, unit)} | {fmt_figure(value, unit)} | {verdict} |")
    for what, prefix, op, bound, unit in MICRO_TARGETS:
        value = micro_rate(micro, prefix)
        verdict = verdict_cell(value, op, bound, value is not None)
        sign = "≥" if op == ">=" else "≤"
        lines.append(f"| {what} | {sign} {fmt_figure(bound, unit)} | {fmt_figure(value, unit)} | {verdict} |")
    return lines


def machine_cell(result):
    """The machine's busy and steal percentages during a run's load, or a dash."""
    busy, steal = result.get("machine_busy_pct"), result.get("machine_steal_pct")
    return "–" if busy is None or steal is None else f"{busy:.0f} % / {steal:.1f} %"


def figures_table(runs):
    lines = [
        "| run | command | sent | delivered | lost | dup | err | throughput | p50 | p99 | p99.9 "
        "| server CPU | peak RSS | machine busy / steal | notes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for run in runs:
        result = run.get("result") or {}
        notes = []
        if run.get("error"):
            notes.append(f"**failed: {run['error']}**")
        if result.get("connections") is not None:
            notes.append(f"{thousands(result['connections'])} held")
        if result.get("server_rss_per_connection_bytes") is not None:
            notes.append(f"{fmt_bytes(result['server_rss_per_connection_bytes'])} server RSS per connection")
        if result.get("redelivered_after_reconnect") is not None:
            notes.append(f"{thousands(result['redelivered_after_reconnect'])} of the lost came on reconnecting")
        if run.get("rounds", 1) > 1:
            rounds = run["rounds"]
            ranges = run.get("ranges") or {}
            note = f"median of {rounds} rounds"
            if run.get("failed_rounds"):
                note += f" ({run['failed_rounds']} failed)"
            tp = ranges.get("throughput") or []
            if len(tp) > 1:
                note += f": throughput {thousands(min(tp))}–{thousands(max(tp))}/s"
            p99 = ranges.get("p99") or []
            if len(p99) > 1 and latency(run, "p99") is not None:
                note += f", p99 {fmt_us(min(p99))}–{fmt_us(max(p99))}"
            notes.append(note)
        if run.get("attempts", 1) > 1:
            notes.append(f"{run['attempts']} attempts, the last one shown")
        notes.append(f"{run['wall_s']:.0f} s wall")

        def count(key):
            value = result.get(key)
            return "–" if value is None else thousands(value)

        throughput = result.get("throughput_per_s")
        cpu = result.get("server_cpu_s")
        rss = result.get("server_peak_rss_bytes")
        lines.append(
            "| "
            + " | ".join(
                [
                    run["label"],
                    f"`{run['command']}`",
                    count("sent"),
                    count("delivered"),
                    count("lost"),
                    count("duplicates"),
                    count("errors"),
                    "–" if throughput is None else f"{thousands(throughput)}/s",
                    fmt_us(latency(run, "p50")),
                    fmt_us(latency(run, "p99")),
                    fmt_us(latency(run, "p999")),
                    "–" if cpu is None else f"{cpu:.1f} s",
                    "–" if rss is None else f"{rss / (1024 * 1024):.0f} MiB",
                    machine_cell(result),
                    "; ".join(notes),
                ]
            )
            + " |"
        )
    return lines


def micro_estimates(criterion_dir, since):
    """(name, median ns, CI low, CI high, throughput text) of criterion's estimates newer than
    the `since` file: those of this run, not stale ones of benchmarks since removed."""
    if not since or not os.path.exists(since) or not os.path.isdir(criterion_dir):
        return []
    started = os.path.getmtime(since)
    rows = []
    pattern = os.path.join(criterion_dir, "**", "new", "estimates.json")
    for path in sorted(glob.glob(pattern, recursive=True)):
        if os.path.getmtime(path) < started:
            continue
        try:
            with open(path) as f:
                median = json.load(f)["median"]
        except (OSError, ValueError, KeyError):
            continue
        new_dir = os.path.dirname(path)
        name = os.path.relpath(os.path.dirname(new_dir), criterion_dir)
        throughput = ""
        try:
            with open(os.path.join(new_dir, "benchmark.json")) as f:
                info = json.load(f)
            name = info.get("full_id") or name
            amount = info.get("throughput") or {}
            for kind, n in amount.items():
                per_s = n / (median["point_estimate"] / 1e9)
                if kind.startswith("Bytes"):
                    throughput = f"{per_s / (1024 * 1024):,.1f} MiB/s"
                else:
                    throughput = f"{thousands(per_s)} elements/s"
        except (OSError, ValueError, TypeError, ZeroDivisionError):
            pass
        interval = median.get("confidence_interval", {})
        rows.append(
            (name, median["point_estimate"], interval.get("lower_bound"), interval.get("upper_bound"), throughput)
        )
    return rows


def block(meta, runs, micro, svg_links):
    config, m = meta["config"], meta["machine"]
    ram = f"{m['ram_bytes'] / 1024**3:.1f} GiB RAM" if m.get("ram_bytes") else "RAM unknown"
    commit = (m.get("commit") or "unknown") + (" with uncommitted changes" if m.get("dirty") else "")
    total = config.get("total_s")
    out = [
        BEGIN,
        "<!-- Written by scripts/bench.sh: edits between these markers are lost on its next run. -->",
        "",
    ]
    if meta.get("quick"):
        out += [
            "**Quick run** (`scripts/bench.sh --quick`): short and small, to test the script; not "
            "figures to quote.",
            "",
        ]
    out += [
        f"- date: {meta['date']}" + (f"; the suite took {fmt_duration(float(total))}" if total else ""),
        f"- machine: {m.get('cores')} cores ({m.get('cpu')}), {ram}, {m.get('kernel')}",
        f"- build: {m.get('rustc')}, release profile; commit `{commit}`",
        f"- suite: {config.get('duration')} s of load per run, 128 B bodies, sync durability unless "
        + (
            f"said; {config['repeat']} rounds of the whole list, each figure the median of its "
            "rounds (lost, duplicates and errors summed over them); "
            if int(config.get("repeat", 1)) > 1
            else "said; "
        )
        + "each run spawns its own server (`--spawn`, a fresh data directory) on 127.0.0.1, and "
        "clients and server share the machine's cores",
        "",
        "Latency is closed loop at full speed (8 sends in flight per sender, so it is mostly "
        "queueing), from the intended send time with `--rate` (open loop), and per operation for "
        "login, resume, handshake (connect, TLS, hello, then the request) and connections (time to "
        "open one). Throughput is messages delivered per second, or operations completed per "
        "second, or connections opened per second. Server CPU and peak RSS cover the whole run, its "
        "setup (sign-ups hash passwords) and the closing of its connections included. Machine busy "
        "and steal are the whole machine's, in percent of all its cores' time, over the load (relay: "
        "while the senders send; offline: until the last message is in; connections: while they "
        "open; from `/proc/stat`): steal is time the hypervisor gave to other guests while "
        "this one wanted to run, and it comes in bursts that stall whatever was running, so a run "
        "with steal has its tail latency and throughput from a slower machine. `sfc-bench` "
        "is `target/release/sfc-bench`.",
        "",
    ]
    out += targets_table(runs, micro)
    out += ["", "All figures:", ""]
    out += figures_table(runs)
    out += [""]
    for alt, link in svg_links:
        out += [f"![{alt}]({link})", ""]
    if micro:
        out += [
            "Micro benchmarks (`cargo bench --bench micro`): criterion's median and its 95 % "
            f"confidence interval, {config.get('micro_time', '?')} s of warm-up and of measurement "
            "each:",
            "",
            "| benchmark | median | 95 % CI | throughput |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, median, low, high, throughput in micro:
            ci = f"{fmt_time_ns(low)} – {fmt_time_ns(high)}" if low is not None and high is not None else "–"
            out.append(f"| `{name}` | {fmt_time_ns(median)} | {ci} | {throughput or '–'} |")
        out += [""]
    out.append(END)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# SVG line charts


class Axis:
    """A linear or log10 axis from lo to hi with ticks [(value, label)]."""

    def __init__(self, lo, hi, ticks, label, log=False):
        self.lo, self.hi, self.ticks, self.label, self.log = lo, hi, ticks, label, log

    def fraction(self, v):
        if self.log:
            lo, hi, v = math.log10(self.lo), math.log10(self.hi), math.log10(max(v, 1e-12))
        else:
            lo, hi = self.lo, self.hi
        return (v - lo) / (hi - lo) if hi != lo else 0.5


def nice_linear_ticks(hi, count=5):
    """0 to a round number at or above hi, with about `count` round steps."""
    if hi <= 0:
        hi = 1
    raw = hi / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    top = step * math.ceil(hi / step - 1e-9)
    ticks = []
    v = 0.0
    while v <= top + step / 2:
        ticks.append(v)
        v += step
    return top, ticks


def fmt_count(v, top):
    """A tick of an axis that ends at `top`: in thousands (k) from 10,000 on."""
    if top >= 10_000 and v:
        return f"{v / 1e3:g}k"
    return f"{v:,.0f}"


def fmt_decade(us):
    """A power of ten of microseconds: 100 µs, 1 ms, 10 ms, 1 s."""
    for unit, scale in (("s", 1e6), ("ms", 1e3), ("µs", 1)):
        if us >= scale:
            return f"{us / scale:g} {unit}"
    return f"{us:g} µs"


def svg_chart(title, x, y, series, note=None):
    """series: dicts with name, points [(x, y)], and optional line (bool), marker ('circle',
    'diamond'), hollow (bool), labels {index: text}."""
    width, height = 760, 470
    left, right, top, bottom = 84, 44, 78, 78
    pw, ph = width - left - right, height - top - bottom

    def px(v):
        return left + x.fraction(v) * pw

    def py(v):
        return top + (1 - y.fraction(v)) * ph

    s = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="13">',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{width / 2}" y="26" text-anchor="middle" font-size="16" font-weight="bold" '
        f'fill="#222">{escape(title)}</text>',
    ]
    # Grid, ticks and tick labels.
    for value, label in y.ticks:
        yy = py(value)
        s.append(f'<line x1="{left}" y1="{yy:.1f}" x2="{left + pw}" y2="{yy:.1f}" stroke="#e3e3e3"/>')
        s.append(f'<line x1="{left - 5}" y1="{yy:.1f}" x2="{left}" y2="{yy:.1f}" stroke="#444"/>')
        s.append(
            f'<text x="{left - 8}" y="{yy + 4:.1f}" text-anchor="end" fill="#333">{escape(label)}</text>'
        )
    for value, label in x.ticks:
        xx = px(value)
        s.append(f'<line x1="{xx:.1f}" y1="{top}" x2="{xx:.1f}" y2="{top + ph}" stroke="#e3e3e3"/>')
        s.append(f'<line x1="{xx:.1f}" y1="{top + ph}" x2="{xx:.1f}" y2="{top + ph + 5}" stroke="#444"/>')
        s.append(
            f'<text x="{xx:.1f}" y="{top + ph + 20}" text-anchor="middle" fill="#333">{escape(label)}</text>'
        )
    s.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    # Axis labels.
    s.append(
        f'<text x="{left + pw / 2}" y="{top + ph + 42}" text-anchor="middle" fill="#222">{escape(x.label)}</text>'
    )
    s.append(
        f'<text transform="translate(20 {top + ph / 2}) rotate(-90)" text-anchor="middle" '
        f'fill="#222">{escape(y.label)}</text>'
    )
    # Series.
    legend = []
    for i, serie in enumerate(series):
        colour = serie.get("colour", COLOURS[i % len(COLOURS)])
        points = [(px(a), py(b)) for a, b in serie["points"]]
        if not points:
            continue
        if serie.get("line", True) and len(points) > 1:
            path = " ".join(f"{a:.1f},{b:.1f}" for a, b in points)
            dash = ' stroke-dasharray="6 4"' if serie.get("dashed") else ""
            s.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2.2"{dash}/>')
        for j, (a, b) in enumerate(points):
            s.append(marker(serie.get("marker", "circle"), a, b, colour, serie.get("hollow", False)))
            label = serie.get("labels", {}).get(j)
            if label:
                # Left of points near the right edge, so that the label stays inside.
                near_edge = a > left + 0.85 * pw
                anchor, tx = ("end", a - 8) if near_edge else ("start", a + 8)
                s.append(
                    f'<text x="{tx:.1f}" y="{b - 8:.1f}" text-anchor="{anchor}" fill="{colour}" '
                    f'font-size="12" stroke="#ffffff" '
                    f'stroke-width="3" paint-order="stroke">{escape(label)}</text>'
                )
        legend.append((serie["name"], colour, serie.get("marker", "circle"), serie.get("hollow", False), serie.get("line", True)))
    # Legend: one row under the title.
    lx, ly = left, 52
    for name, colour, shape, hollow, line in legend:
        if line:
            s.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 24}" y2="{ly}" stroke="{colour}" stroke-width="2.2"/>')
        s.append(marker(shape, lx + 12, ly, colour, hollow))
        s.append(f'<text x="{lx + 30}" y="{ly + 4}" fill="#222">{escape(name)}</text>')
        lx += 30 + 7.2 * len(name) + 26
    if note:
        s.append(
            f'<text x="{width - 8}" y="{height - 8}" text-anchor="end" font-size="11" fill="#666">{escape(note)}</text>'
        )
    s.append("</svg>")
    return "\n".join(s) + "\n"


def marker(shape, x, y, colour, hollow):
    fill = "#ffffff" if hollow else colour
    if shape == "diamond":
        r = 6
        return (
            f'<polygon points="{x:.1f},{y - r:.1f} {x + r:.1f},{y:.1f} {x:.1f},{y + r:.1f} {x - r:.1f},{y:.1f}" '
            f'fill="{fill}" stroke="{colour}" stroke-width="2"/>'
        )
    if shape == "square":
        r = 4.5
        return (
            f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r}" height="{2 * r}" fill="{fill}" '
            f'stroke="{colour}" stroke-width="2"/>'
        )
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{fill}" stroke="{colour}" stroke-width="2"/>'


def throughput_svg(runs):
    """Relay throughput at full speed against pairs, one line per durability."""
    lines = {}
    for run in runs:
        p = run["params"]
        value = figure(run, "throughput")
        if p.get("scenario") != "relay" or p.get("rate") is not None or value is None:
            continue
        # Copies per second are not messages per second: runs with devices are a table row only.
        if p.get("devices", 1) != 1:
            continue
        lines.setdefault(p.get("durability", "sync"), []).append((p.get("clients", 10), value))
    if not lines:
        return None
    xs = sorted({c for points in lines.values() for c, _ in points})
    ymax = max(v for points in lines.values() for _, v in points)
    top, yticks = nice_linear_ticks(ymax * 1.08)
    lo, hi = min(xs), max(xs)
    if lo == hi:
        lo, hi = lo / 2, hi * 2
    x = Axis(lo / 1.3, hi * 1.3, [(c, f"{c:,}") for c in xs], "sender/receiver pairs (log scale)", log=True)
    y = Axis(0, top, [(t, fmt_count(t, top)) for t in yticks], "messages delivered per second")
    series = []
    for i, (durability, points) in enumerate(sorted(lines.items(), key=lambda kv: kv[0] != "sync")):
        points.sort()
        series.append(
            {
                "name": f"{durability} durability",
                "points": points,
                "marker": "circle" if durability == "sync" else "square",
                "colour": COLOURS[i % len(COLOURS)],
                "labels": {j: thousands(v) for j, (_, v) in enumerate(points)},
            }
        )
    return svg_chart("Relay throughput at full speed (sfc-bench relay)", x, y, series,
                     note="8 sends in flight per sender; 128 B bodies")


def nines(p):
    """Percentile p (0 to 100) on the 'nines' scale: 90 -> 1, 99 -> 2, 99.9 -> 3."""
    return -math.log10(max(1 - p / 100, 1e-12))


def latency_svg(runs):
    """The latency distribution of the open-loop relay run(s) against percentile."""
    chosen = [
        r for r in runs
        if r["params"].get("scenario") == "relay" and r["params"].get("rate") is not None and figure(r, "p50")
    ]
    if not chosen:
        return None
    series, values, xmax = [], [], 1.0
    for i, run in enumerate(chosen):
        result = run["result"]
        count = max(result.get("delivered") or 1, 1)
        pairs = result.get("latency_percentiles_us") or []
        points, labels = [], {}
        for p, v in pairs:
            # Past 1 - 1/count a percentile only repeats the largest value: plot that once.
            if p < 100 and 1 - p / 100 >= 1 / count:
                points.append((nines(p), max(v, 1)))
        top = math.log10(count)
        maximum = result["latency_us"]["max"]
        if count > 1 and (not points or top > points[-1][0]):
            points.append((top, max(maximum, 1)))
            labels[len(points) - 1] = f"max {fmt_us(maximum)}"
        values += [v for _, v in points]
        xmax = max(xmax, top)
        p = run["params"]
        series.append(
            {
                "name": f"{p.get('clients')} pairs at {thousands(p['rate'])} msg/s",
                "points": points,
                "colour": COLOURS[i % len(COLOURS)],
                "labels": labels,
            }
        )
    goals = [(50, 100), (99, 150), (99.9, 1500)]
    series.append(
        {
            "name": "issue 4 targets (p50, p99, p99.9)",
            "points": [(nines(p), v) for p, v in goals],
            "line": False,
            "marker": "diamond",
            "hollow": True,
            "colour": "#D55E00",
        }
    )
    values += [v for _, v in goals]
    # A decade of room below the lowest point when it would sit on the axis.
    lo = 10 ** math.floor(math.log10(min(values) / 1.5))
    hi = 10 ** math.ceil(math.log10(max(values) * 1.2))
    yticks = []
    decade = lo
    while decade <= hi * 1.0001:
        yticks.append((decade, fmt_decade(decade)))
        decade *= 10
    xmax = math.ceil(xmax + 0.05)
    names = {0: "0%", 1: "90%", 2: "99%", 3: "99.9%", 4: "99.99%", 5: "99.999%", 6: "99.9999%"}
    xticks = [(0, "0%"), (nines(50), "50%")] + [(k, names.get(k, f"{k} nines")) for k in range(1, xmax + 1)]
    x = Axis(0, xmax, xticks, "percentile (log scale of nines: 90%, 99%, 99.9%, ...)")
    y = Axis(lo, hi, yticks, "latency (log scale)", log=True)
    return svg_chart("Relay latency at a fixed rate (open loop)", x, y, series,
                     note="from each message's intended send time to its delivery; HDR histogram")


# ---------------------------------------------------------------------------------------------
# report


def replace_block(doc_path, new_block):
    with open(doc_path, encoding="utf-8") as f:
        text = f.read()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        sys.exit(f"bench_report: {doc_path} needs one '{BEGIN}' line and, after it, one '{END}' line")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    text = text[:start] + new_block + text[end:]
    with open(doc_path, "w", encoding="utf-8") as f:
        f.write(text)


def cmd_report(args):
    with open(args.meta) as f:
        meta = json.load(f)
    runs = []
    with open(args.results) as f:
        for line in f:
            if line.strip():
                runs.append(json.loads(line))
    runs = combine_rounds(runs)
    os.makedirs(args.svg_dir, exist_ok=True)
    doc_dir = os.path.dirname(os.path.abspath(args.doc))
    links = []
    for name, alt, make in (
        ("throughput.svg", "Relay throughput at full speed against pairs", throughput_svg),
        ("latency.svg", "Relay latency at a fixed rate against percentile", latency_svg),
    ):
        path = os.path.join(args.svg_dir, name)
        svg = make(runs)
        if svg is None:
            if os.path.exists(path):
                os.remove(path)
            continue
        with open(path, "w", encoding="utf-8") as f:
            f.write(svg)
        links.append((alt, os.path.relpath(os.path.abspath(path), doc_dir)))
    micro = micro_estimates(args.criterion_dir, args.since) if args.criterion_dir else []
    replace_block(args.doc, block(meta, runs, micro, links))
    # A summary for the terminal.
    for run in runs:
        result = run.get("result") or {}
        state = run["error"] or "ok"
        print(
            f"{run['label']:<36} {fmt_figure(result.get('throughput_per_s'), '/s'):>14}  "
            f"p50 {fmt_us(latency(run, 'p50')):>9}  p99 {fmt_us(latency(run, 'p99')):>9}  "
            f"lost {result.get('lost', '–')}  machine busy/steal {machine_cell(result)}  {state}"
        )
    for line in targets_table(runs, micro)[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        print(f"target: {cells[0]}: {cells[2]} (goal {cells[1]}): {cells[3].strip('*')}")
    print(f"bench_report: wrote {args.doc} and {len(links)} plot(s) in {args.svg_dir}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    meta = sub.add_parser("meta", help="machine and configuration as JSON")
    meta.add_argument("--quick", default="0")
    meta.add_argument("--config", action="append", help="key=value")
    meta.add_argument("--update", help="a meta file to add --config to")
    record = sub.add_parser("record", help="one sfc-bench run as a JSON line")
    record.add_argument("--label", required=True)
    record.add_argument("--start", type=float, required=True)
    record.add_argument("--end", type=float, required=True)
    record.add_argument("--exit", type=int, required=True)
    record.add_argument("--attempts", type=int, default=1, help="runs made, the last one kept")
    record.add_argument("--stdout", required=True)
    record.add_argument("argv", nargs="*", help="sfc-bench's arguments (after --)")
    report = sub.add_parser("report", help="write the block of BENCHMARKS.md and the plots")
    report.add_argument("--results", required=True)
    report.add_argument("--meta", required=True)
    report.add_argument("--doc", required=True)
    report.add_argument("--svg-dir", required=True)
    report.add_argument("--criterion-dir")
    report.add_argument("--since", help="only criterion estimates newer than this file")
    args = parser.parse_args()
    {"meta": cmd_meta, "record": cmd_record, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
