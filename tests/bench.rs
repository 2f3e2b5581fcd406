//! `sfc-bench` in a short configuration: every scenario runs against a spawned server, its JSON
//! parses, and nothing is lost or doubled.

use std::ffi::OsString;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

mod common;

/// Runs `sfc-bench ARGS --json` (at most 120 s) and parses its one line of JSON.
async fn run_json(args: Vec<OsString>) -> serde_json::Value {
    let run = Command::new(env!("CARGO_BIN_EXE_sfc-bench"))
        .args(&args)
        .arg("--json")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "one JSON object: {text}");
    serde_json::from_str(&text).unwrap()
}

async fn bench(scenario: &str, clients: u32, extra: &[&str]) -> serde_json::Value {
    let mut args: Vec<OsString> = vec![
        scenario.into(),
        "--spawn".into(),
        "--server-bin".into(),
        env!("CARGO_BIN_EXE_sfc-server").into(),
        "--clients".into(),
        clients.to_string().into(),
    ];
    args.extend(["--duration", "1", "--backlog", "100"].map(OsString::from));
    args.extend(extra.iter().map(OsString::from));
    run_json(args).await
}

/// Something was sent, and everything sent arrived once, without errors.
fn check_counts(report: &serde_json::Value) {
    let sent = report["sent"].as_u64().unwrap();
    assert!(sent > 0, "{report}");
    assert_eq!(report["delivered"].as_u64().unwrap(), sent, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicates"], 0, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
}

fn check(report: &serde_json::Value, scenario: &str) {
    assert_eq!(report["scenario"], scenario);
    check_counts(report);
    assert!(
        report["throughput_per_s"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    for key in ["p50", "p90", "p99", "p999", "max"] {
        assert!(report["latency_us"][key].is_u64(), "{key}: {report}");
    }
    // `[percentile, µs]` pairs from 0 to 100, both non-decreasing, agreeing with `latency_us`.
    let pairs: Vec<(f64, u64)> = report["latency_percentiles_us"]
        .as_array()
        .unwrap_or_else(|| panic!("latency_percentiles_us: {report}"))
        .iter()
        .map(|pair| (pair[0].as_f64().unwrap(), pair[1].as_u64().unwrap()))
        .collect();
    assert!(pairs.len() >= 10, "{report}");
    assert_eq!(pairs.first().unwrap().0, 0.0, "{report}");
    assert_eq!(pairs.last().unwrap().0, 100.0, "{report}");
    for step in pairs.windows(2) {
        assert!(step[0].0 < step[1].0, "percentiles increase: {report}");
        assert!(
            step[0].1 <= step[1].1,
            "latencies do not decrease: {report}"
        );
    }
    let at = |p: f64| pairs.iter().find(|pair| pair.0 == p).map(|pair| pair.1);
    assert_eq!(at(50.0), report["latency_us"]["p50"].as_u64(), "{report}");
    assert_eq!(at(99.9), report["latency_us"]["p999"].as_u64(), "{report}");
    assert_eq!(at(100.0), report["latency_us"]["max"].as_u64(), "{report}");
    assert!(report["server_cpu_s"].as_f64().unwrap() > 0.0, "{report}");
    // A relay's generator reports its own CPU over the load, per delivered copy: it sealed and
    // opened them all.
    if report["scenario"] == "relay" {
        let client = report["client_cpu_load_s"].as_f64().unwrap();
        let per = report["client_cpu_us_per_delivery"].as_f64().unwrap();
        let delivered = report["delivered"].as_f64().unwrap();
        assert!(client > 0.0 && per > 0.0, "{report}");
        assert!(
            (per - client * 1e6 / delivered).abs() < 1e-6 * per.max(1.0),
            "{report}"
        );
    }
    assert!(
        report["server_peak_rss_bytes"].as_u64().unwrap() > 1 << 20,
        "{report}"
    );
    // The machine's load during the load phase, which kept it busy: present on Linux unless the
    // phase was too short to tell (a few connections open in a blink); the relay's is seconds.
    let busy = report["machine_busy_pct"].as_f64();
    let steal = report["machine_steal_pct"].as_f64();
    match (busy, steal) {
        (Some(busy), Some(steal)) => {
            assert!(busy > 0.0 && steal >= 0.0, "{report}");
            assert!(busy + steal <= 100.0 + 1e-9, "{report}");
        }
        (None, None) => assert!(
            scenario != "relay" || !cfg!(target_os = "linux"),
            "{report}"
        ),
        _ => panic!("busy and steal come together: {report}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_full_speed_and_open_loop() {
    let report = bench("relay", 3, &[]).await;
    check(&report, "relay");
    assert!(report["latency_us"]["p50"].as_u64().unwrap() > 0);
    assert!(report.get("pacer_lateness_us").is_none(), "{report}");
    // One device per user (the default): one copy per message, all the receiver's device 1's.
    check_devices(&report, 1);
    check_packets(&report);
    let report = bench("relay", 3, &["--rate", "300"]).await;
    check(&report, "relay");
    check_packets(&report);
    // 300/s for 1 s: the schedule is honoured within a margin.
    let sent = report["sent"].as_u64().unwrap();
    assert!((200..=330).contains(&sent), "{report}");
    // Open loop reports how late its pacer was (part of the latency it measures).
    let late = &report["pacer_lateness_us"];
    let (p50, max) = (late["p50"].as_u64(), late["max"].as_u64());
    assert!(
        matches!((p50, max), (Some(p50), Some(max)) if p50 >= 1 && p50 <= max),
        "{report}"
    );
}

/// The relay's traffic from quinn's counters: every message is a stream of its own each way,
/// so at least one STREAM frame per message goes from the senders and to the receivers, each
/// direction carried datagrams, and the total is their sum.
fn check_packets(report: &serde_json::Value) {
    let packets = &report["packets"];
    let mut total = 0.0;
    for direction in ["senders_out", "senders_in", "receivers_out", "receivers_in"] {
        let datagrams = packets[direction]["datagrams"].as_f64().unwrap();
        assert!(datagrams > 0.0, "{direction}: {report}");
        total += datagrams;
    }
    for direction in ["senders_out", "receivers_in"] {
        let streams = packets[direction]["frames"]["stream"].as_f64().unwrap();
        assert!(streams >= 1.0, "{direction}: {report}");
    }
    let per_message = packets["datagrams_per_message"].as_f64().unwrap();
    assert!((per_message - total).abs() < 1e-6, "{report}");
    // quinn starts every path at 1,200 bytes and never goes below.
    assert!(packets["mtu"][0].as_u64().unwrap() >= 1200, "{report}");
}

/// A relay report with `devices` devices per user: each message carried 2N − 1 copies, and
/// each receiving device (the receiver's 1..N, the sender's 2..N) got every message sent
/// exactly once; `delivered` counts the copies.
fn check_devices(report: &serde_json::Value, devices: u64) {
    let sent = report["sent"].as_u64().unwrap();
    assert!(sent > 0, "{report}");
    assert_eq!(report["devices"], devices, "{report}");
    assert_eq!(report["copies_per_message"], 2 * devices - 1, "{report}");
    assert_eq!(
        report["delivered"].as_u64().unwrap(),
        sent * (2 * devices - 1),
        "{report}"
    );
    for key in ["lost", "duplicates", "errors"] {
        assert_eq!(report[key], 0, "{key}: {report}");
    }
    let rows: Vec<(String, u64, u64, u64, u64)> = report["deliveries_per_device"]
        .as_array()
        .unwrap_or_else(|| panic!("deliveries_per_device: {report}"))
        .iter()
        .map(|row| {
            (
                row["owner"].as_str().unwrap().to_owned(),
                row["device"].as_u64().unwrap(),
                row["delivered"].as_u64().unwrap(),
                row["lost"].as_u64().unwrap(),
                row["duplicates"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, u64, u64, u64, u64)> = (1..=devices)
        .map(|d| ("receiver".to_owned(), d, sent, 0, 0))
        .chain((2..=devices).map(|d| ("sender".to_owned(), d, sent, 0, 0)))
        .collect();
    assert_eq!(rows, expected, "{report}");
    assert!(report["setup_s"].as_f64().unwrap() > 0.0, "{report}");
}

/// `--devices 2`: every user's second device is linked to its first through the server; the
/// sender's device 1 seals each message for the receiver's two devices and its own second one,
/// and each of the three got every message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_with_two_devices_reaches_every_device_once() {
    let report = bench("relay", 3, &["--devices", "2"]).await;
    check_devices(&report, 2);
    assert!(
        report["throughput_per_s"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    // The other scenarios have one device per user and say so.
    let refused = Command::new(env!("CARGO_BIN_EXE_sfc-bench"))
        .args(["offline", "--devices", "2", "--spawn", "--server-bin"])
        .arg(env!("CARGO_BIN_EXE_sfc-server"))
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success(), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_fills_and_drains_every_inbox() {
    let report = bench("offline", 3, &[]).await;
    check(&report, "offline");
    assert_eq!(report["sent"], 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_resume_and_handshake_loops() {
    for scenario in ["login", "resume", "handshake"] {
        check(&bench(scenario, 3, &[]).await, scenario);
    }
    // `--rate` paces them too: 50 handshakes/s for 1 s over 3 loops.
    let report = bench("handshake", 3, &["--rate", "50"]).await;
    check(&report, "handshake");
    let done = report["sent"].as_u64().unwrap();
    assert!((30..=51).contains(&done), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_held_and_measured() {
    // Over the default few shared client sockets, and over one socket per connection.
    for sockets in ["4", "0"] {
        let report = bench("connections", 20, &["--client-sockets", sockets]).await;
        check(&report, "connections");
        assert_eq!(report["connections"], 20);
        assert!(
            report["server_rss_per_connection_bytes"].is_u64(),
            "{report}"
        );
    }
}

/// Against a server whose inboxes hold 4 pending messages, a relay sender at full speed is
/// refused (`inbox_full`) again and again; it sends each refused message again, sealed once
/// under the same id, so every message still arrives once and the sessions hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_resends_what_a_full_inbox_refused() {
    let server = common::TestServer::start_with(|config| config.max_pending = 4).await;
    let report = run_json(vec![
        "relay".into(),
        "--server".into(),
        server.addr.to_string().into(),
        "--ca".into(),
        server.ca_file().into(),
        "--clients".into(),
        "1".into(),
        "--duration".into(),
        "1".into(),
    ])
    .await;
    check_counts(&report);
    assert!(report["refused"].as_u64().unwrap() > 0, "{report}");
    // Not spawned: no server figures.
    assert!(report["server_cpu_s"].is_null(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_reaches_every_member_once_and_times_the_commits() {
    let report = run_json(
        [
            "fanout",
            "--server-bin",
            env!("CARGO_BIN_EXE_sfc-server"),
            "--members",
            "4",
            "--messages",
            "20",
        ]
        .map(OsString::from)
        .to_vec(),
    )
    .await;
    assert_eq!(report["members"], 4, "{report}");
    assert_eq!(report["expected"], 60, "{report}");
    assert_eq!(report["delivered"], 60, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicates"], 0, "{report}");
    assert!(
        report["deliveries_per_s"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(
        report["latency_to_last_member_us"]["p50"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(
        report["commit_latency_us"]["p50"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(report["message_bytes"].as_u64().unwrap() > 128, "{report}");
}
