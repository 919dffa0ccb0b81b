//! The report: the table of every row, the ratios, and the one JSON record (printed, and
//! written to `--json` when given).

use crate::measure::Sample;
use crate::Args;
use anyhow::Result;
use std::io::Write;
use wire::PieceLayout;

/// The rows of a full run.
pub(crate) struct Rows {
    pub(crate) baseline: Sample,
    pub(crate) one: Sample,
    pub(crate) one_verified: Sample,
    pub(crate) two: Sample,
    pub(crate) plain_quinn: Option<Sample>,
    pub(crate) ours_quic: Option<Sample>,
    pub(crate) quic_verified: Option<Sample>,
    pub(crate) shaped: Sample,
}

/// Prints the table, the ratios and the JSON record of a full run.
pub(crate) fn print(args: &Args, size: u64, layout: PieceLayout, rows: &Rows) -> Result<()> {
    let &Rows {
        baseline,
        one,
        one_verified,
        two,
        plain_quinn,
        ours_quic,
        quic_verified,
        shaped,
    } = rows;
    let mut results = serde_json::Map::new();
    println!();
    println!(
        "{:<44} {:>9} {:>10} {:>14} {:>14}",
        "variant", "GB/s", "vs (a)", "cores per GB/s", "serving side"
    );
    let row = |name: &str, s: &Sample| {
        let serve = if s.serve_cpu_secs > 0.0 {
            format!("{:.2}", s.serve_cpu_per_gbps())
        } else {
            "-".to_string()
        };
        println!(
            "{:<44} {:>9.2} {:>9.2}x {:>14.2} {:>14}",
            name,
            s.gbps(),
            s.gbps() / baseline.gbps(),
            s.cpu_per_gbps(),
            serve
        );
    };
    row("(a) sendfile -> reader writing a file", &baseline);
    row("(b) our TCP, 1 thread per side", &one);
    row(
        "(b') same, every piece checked vs its digest",
        &one_verified,
    );
    row("(b) our TCP, 2 threads per side (2 tasks)", &two);
    match (&plain_quinn, &ours_quic) {
        (Some(pq), Some(q)) => {
            row("(c) plain quinn, one stream", pq);
            row("(d) our QUIC, 1 thread per side", q);
            if let Some(qv) = &quic_verified {
                row("(d') same, every piece checked vs its digest", qv);
            }
        }
        _ => println!("{:<44} {:>9}", "(c), (d) QUIC", "skipped"),
    }
    let shaped_rate = shaped.bytes as f64 / shaped.secs;
    let limit = (args.shaped_mbps * 1_000_000) as f64;
    println!(
        "{:<44} {:>9.3} {:>10}   limit {:.3} GB/s, error {:+.1} %",
        "(e) our TCP, download limit",
        shaped_rate / 1e9,
        "",
        limit / 1e9,
        (shaped_rate / limit - 1.0) * 100.0
    );
    println!();
    println!(
        "ratio ours/sendfile (1 thread): {:.2}",
        one.gbps() / baseline.gbps()
    );
    if let (Some(pq), Some(q)) = (&plain_quinn, &ours_quic) {
        println!(
            "our QUIC: {:.2} GB/s, {:.2}x plain quinn",
            q.gbps(),
            q.gbps() / pq.gbps()
        );
    }
    println!(
        "scaling 1 -> 2 threads: {:.2}x (this machine has {} cores, shared by sender and receiver)",
        two.gbps() / one.gbps(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    results.insert("size_bytes".into(), size.into());
    results.insert("piece_length".into(), layout.piece_length().into());
    results.insert("pieces_in_flight".into(), args.pieces_in_flight.into());
    results.insert("bytes_in_flight".into(), (args.mib_in_flight << 20).into());
    results.insert("sendfile".into(), serde_json::to_value(baseline)?);
    results.insert("ours_tcp_1_thread".into(), serde_json::to_value(one)?);
    results.insert("ours_tcp_2_threads".into(), serde_json::to_value(two)?);
    results.insert(
        "ours_tcp_1_thread_verified".into(),
        serde_json::to_value(one_verified)?,
    );
    if let Some(qv) = &quic_verified {
        results.insert("ours_quic_verified".into(), serde_json::to_value(qv)?);
    }
    results.insert(
        "ratio_ours_vs_sendfile".into(),
        (one.gbps() / baseline.gbps()).into(),
    );
    results.insert(
        "ours_tcp_serving_cores_per_gbps".into(),
        one.serve_cpu_per_gbps().into(),
    );
    if let (Some(pq), Some(q)) = (&plain_quinn, &ours_quic) {
        results.insert("plain_quinn".into(), serde_json::to_value(pq)?);
        results.insert("ours_quic".into(), serde_json::to_value(q)?);
        results.insert("ours_quic_gbps".into(), q.gbps().into());
    }
    results.insert("shaped_limit_bytes_per_sec".into(), limit.into());
    results.insert("shaped_measured_bytes_per_sec".into(), shaped_rate.into());
    results.insert(
        "shaped_error_percent".into(),
        ((shaped_rate / limit - 1.0) * 100.0).into(),
    );
    let json = serde_json::Value::Object(results).to_string();
    println!("{json}");
    if let Some(p) = &args.json {
        let mut f = std::fs::File::create(p)?;
        writeln!(f, "{json}")?;
    }
    Ok(())
}
