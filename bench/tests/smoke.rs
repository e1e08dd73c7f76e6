//! The CI smoke of every benchmark scenario: each runs small, prints its summary line with the fixed
//! field names, and delivers everything. No timing is judged here; see `docs/benchmarks.md`.

#[test]
fn every_scenario_runs_small_and_delivers_everything() {
    let bench = env!("CARGO_BIN_EXE_mesh-bench");
    let mesh = std::path::Path::new(bench).with_file_name("mesh");
    assert!(
        mesh.exists(),
        "the mesh binary is built beside mesh-bench by `cargo test --workspace`: {}",
        mesh.display()
    );
    let out = std::process::Command::new(bench)
        .args(["--json", "smoke"])
        .arg("--mesh-bin")
        .arg(&mesh)
        .output()
        .expect("mesh-bench");
    assert!(out.status.success(), "mesh-bench smoke failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let scenarios: Vec<&str> = lines.iter().map(|l| l["scenario"].as_str().expect("scenario")).collect();
    // `load` three times: as fast as possible, at an offered rate, over TLS; `throughput` twice: over
    // ws:// and over wss://. Then, with PostgreSQL, load, throughput and a wake-up across two replicas.
    let mut expected = vec![
        "send",
        "load",
        "load",
        "load",
        "throughput",
        "throughput",
        "fanout_broadcast",
        "fanout_sse",
        "mcp",
        "webhook",
    ];
    let postgres = mesh_testkit::postgres::bindir().is_some() || std::env::var_os("CI").is_some();
    if postgres {
        expected.extend(["load", "throughput", "wake_up"]);
    } else {
        eprintln!("skipped: the smoke's PostgreSQL runs (no initdb here; apt-get install postgresql)");
    }
    assert_eq!(scenarios, expected);
    let transports: Vec<&str> = lines.iter().filter_map(|l| l["transport"].as_str()).collect();
    let mut want_transports = vec!["ws", "ws", "wss", "ws", "wss"];
    if postgres {
        want_transports.extend(["ws", "ws"]);
        let stores: Vec<(&str, u64)> = lines[10..12]
            .iter()
            .map(|l| (l["store"].as_str().unwrap_or("?"), l["replicas"].as_u64().unwrap_or(0)))
            .collect();
        assert_eq!(stores, [("postgres", 2), ("postgres", 2)], "the replica runs ran on two replicas");
    }
    assert_eq!(transports, want_transports, "the TLS runs really ran over wss://");
    for l in &lines {
        for field in ["p50_ms", "p99_ms", "msgs_per_s", "delivered_ratio", "peak_rss_mb"] {
            let applies = match field {
                "msgs_per_s" | "peak_rss_mb" => matches!(l["scenario"].as_str(), Some("load" | "throughput")),
                "delivered_ratio" => l["scenario"] != "send" && l["scenario"] != "throughput",
                _ => l["scenario"] != "throughput",
            };
            if applies {
                assert!(l.get(field).is_some_and(|v| !v.is_null()), "{field} missing in {l}");
            }
        }
        if let Some(ratio) = l.get("delivered_ratio") {
            assert_eq!(ratio.as_f64(), Some(1.0), "not everything was delivered: {l}");
        }
    }
    for throughput in &lines[4..6] {
        assert_eq!(throughput["delivered_per_s"].as_f64().map(|x| x > 0.0), Some(true), "{throughput}");
    }
    assert_eq!(lines[9]["refused_signatures"], 0, "every webhook request verified: {}", lines[9]);
}
