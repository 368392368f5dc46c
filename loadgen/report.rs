//! Reporting: the JSON object of a run, the human-readable table (the
//! memory and storm scenarios' own, too), the HdrHistogram `.hgrm`
//! percentile distribution and the SVG plot.
//!
//! Latencies are recorded in ns and reported in µs.

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::Path;

use crate::engine::Outcome;

/// Percentiles of `h` in µs (null when empty).
pub fn lat_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
    json!({
        "count": h.len(),
        "mean": (h.mean() / 100.0).round() / 10.0,
        "p50": us(h.value_at_quantile(0.50)),
        "p90": us(h.value_at_quantile(0.90)),
        "p99": us(h.value_at_quantile(0.99)),
        "p99_9": us(h.value_at_quantile(0.999)),
        "p99_99": us(h.value_at_quantile(0.9999)),
        "max": us(h.max()),
    })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The JSON fields every run reports.
pub fn run_json(scenario: &str, params: Value, o: &Outcome) -> Map<String, Value> {
    let secs = o.duration.as_secs_f64();
    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.to_string(), v);
    };
    put("scenario", json!(scenario));
    put("parameters", params);
    put("sent", json!(o.sent));
    put("delivered", json!(o.delivered));
    put("expected", json!(o.expected));
    put("sent_with_warmup", json!(o.sent_total));
    put("lost", json!(o.expected.saturating_sub(o.delivered)));
    put("sent_per_sec", json!(round2(o.sent as f64 / secs)));
    put(
        "delivered_per_sec",
        json!(round2(o.delivered as f64 / secs)),
    );
    put("bytes_per_sec", json!(round2(o.bytes as f64 / secs)));
    put("latency_us", lat_json(&o.hist));
    put("drops", json!(o.server.drops));
    put("stuck_kills", json!(o.server.stuck_kills));
    put("server_rss_bytes", json!(o.rss));
    put(
        "drops_by_reason",
        Value::Object(o.server.drops_by_reason.clone()),
    );
    put("out_of_order", json!(o.out_of_order));
    put("drain_complete", json!(o.drain_complete));
    put("drain_s", json!(round2(o.drain_s)));
    put("window_waits", json!(o.window_waits));
    put("publisher_truncated", json!(o.truncated));
    put("send_lag_us", o.lag.as_ref().map_or(Value::Null, lat_json));
    put("io_backend", o.io_backend.clone());
    put("shards", o.shards.clone());
    put(
        "server_publishes_deliveries",
        json!([o.server.publishes, o.server.deliveries]),
    );
    put(
        "cpu_s",
        json!({
            "wall": round2(o.wall_s),
            "loadgen": o.loadgen_cpu_s.map(round2),
            "publisher_threads": round2(o.publisher_cpu_s),
            "servers": o.server.cpu_s.map(round2),
            "foreign": o.foreign_cpu_s.map(round2),
        }),
    );
    put("server_rss_bytes_per_node", json!(o.rss_per_node));
    put(
        "subscriber_errors",
        json!(o.sub_errors.iter().take(3).collect::<Vec<_>>()),
    );
    m
}

fn num(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x >= 1e4 => group_digits(x.round() as u64),
        Some(x) if x.fract() == 0.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.1}"),
        None => "-".into(),
    }
}

fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mib(v: &Value) -> String {
    v.as_f64()
        .map_or("unknown".into(), |b| format!("{:.1} MiB", b / 1048576.0))
}

/// Latency line: `p50 … max` in µs.
fn lat_line(v: &Value) -> String {
    if v.is_null() {
        return "no samples".into();
    }
    ["p50", "p90", "p99", "p99_9", "p99_99", "max"]
        .iter()
        .map(|k| format!("{} {}", k.replace('_', "."), num(&v[*k])))
        .collect::<Vec<_>>()
        .join("  ")
}

/// Prints the human-readable summary of a run (and its extras).
pub fn print_table(j: &Value) {
    if j["scenario"] == "memory" {
        print_memory(j);
        return;
    }
    if j["scenario"] == "storm" {
        print_storm(j);
        return;
    }
    let p = &j["parameters"];
    println!(
        "msgc-loadgen {}: {}, {} B, {}, {} s measured",
        j["scenario"].as_str().unwrap_or("?"),
        p["shape"].as_str().unwrap_or(""),
        num(&p["size"]),
        p["mode"].as_str().unwrap_or(""),
        num(&p["duration_s"]),
    );
    println!(
        "  servers      {} ({} backend, {} shards)",
        p["servers"].as_array().map_or(0, Vec::len),
        j["io_backend"].as_str().unwrap_or("?"),
        num(&j["shards"]),
    );
    println!(
        "  sent         {:>14} msgs   {:>12} msgs/s",
        num(&j["sent"]),
        num(&j["sent_per_sec"])
    );
    println!(
        "  delivered    {:>14} msgs   {:>12} msgs/s   {:.1} MB/s   (expected {}, lost {})",
        num(&j["delivered"]),
        num(&j["delivered_per_sec"]),
        j["bytes_per_sec"].as_f64().unwrap_or(0.0) / 1e6,
        num(&j["expected"]),
        num(&j["lost"]),
    );
    println!("  latency µs   {}", lat_line(&j["latency_us"]));
    if !j["send_lag_us"].is_null() {
        println!("  send lag µs  {}", lat_line(&j["send_lag_us"]));
    }
    println!(
        "  server       drops {}, stuck kills {}, peak RSS {}, CPU {} s",
        num(&j["drops"]),
        num(&j["stuck_kills"]),
        mib(&j["server_rss_bytes"]),
        num(&j["cpu_s"]["servers"]),
    );
    println!(
        "  loadgen      CPU {} s (publisher threads {} s; other processes {} s), out of order {}, drain complete {}",
        num(&j["cpu_s"]["loadgen"]),
        num(&j["cpu_s"]["publisher_threads"]),
        num(&j["cpu_s"]["foreign"]),
        num(&j["out_of_order"]),
        j["drain_complete"],
    );
    print_extras(j);
}

fn print_extras(j: &Value) {
    if let Some(b) = j.get("baseline").filter(|b| !b.is_null()) {
        println!("  baseline     latency µs  {}", lat_line(&b["latency_us"]));
        println!(
            "  healthy      {} subscribers: delivered {} of {} (complete: {}), impaired delivered {}",
            num(&j["healthy_subscribers"]),
            num(&j["healthy_delivered"]),
            num(&j["healthy_expected"]),
            j["healthy_complete"],
            num(&j["impaired_delivered"]),
        );
    }
    if j.get("joins").is_some() {
        println!(
            "  churn        {} joins ({} /s of {} asked), events missing {}",
            num(&j["joins"]),
            num(&j["joins_per_sec"]),
            num(&j["join_rate_requested"]),
            num(&j["events_missing"]),
        );
        println!("  join event µs  {}", lat_line(&j["join_event_latency_us"]));
        println!(
            "  leave event µs {}",
            lat_line(&j["leave_event_latency_us"])
        );
        println!("  join() call µs {}", lat_line(&j["join_call_latency_us"]));
    }
    if let Some(errs) = j["subscriber_errors"].as_array().filter(|e| !e.is_empty()) {
        println!("  subscriber errors: {errs:?}");
    }
}

/// Prints the memory scenario: one block per phase, skipped ones said so.
fn print_memory(j: &Value) {
    let p = &j["parameters"];
    println!(
        "msgc-loadgen memory: {} ({} backend, {} shards), RSS from the server's STATS",
        p["measured_server"].as_str().unwrap_or("?"),
        j["io_backend"].as_str().unwrap_or("?"),
        num(&j["shards"]),
    );
    let m = &j["memberships"];
    if m.is_null() {
        println!("  memberships       skipped (--groups 0)");
    } else {
        println!(
            "  memberships       {} groups, one JOIN per round trip ({} joins/s)",
            num(&m["groups"]),
            num(&m["joins_per_sec"]),
        );
        println!(
            "    RSS             {} → {}: {} bytes per membership; after leaving them all {}",
            mib(&m["rss_before_bytes"]),
            mib(&m["rss_after_bytes"]),
            num(&m["bytes_per_membership"]),
            mib(&m["rss_after_leave_bytes"]),
        );
    }
    print_memory_conns(&j["idle_connections"], &j["burst"]);
}

fn print_memory_conns(idle: &Value, burst: &Value) {
    if idle.is_null() {
        println!("  idle connections  skipped (--conns 0)");
    } else {
        println!(
            "  idle connections  {}, each joined to a group of its own (opened in {} s)",
            num(&idle["connections"]),
            num(&idle["open_s"]),
        );
        println!(
            "    RSS             {} → {}: {} bytes per idle connection; after closing them {}",
            mib(&idle["rss_before_bytes"]),
            mib(&idle["rss_after_bytes"]),
            num(&idle["bytes_per_idle_connection"]),
            mib(&idle["rss_after_close_bytes"]),
        );
    }
    if burst.is_null() {
        println!("  burst             skipped (--conns 0 or --burst-size 0)");
        return;
    }
    println!(
        "  burst             {} connections × {} B, one PUBLISH each to a group nobody is in (read in {} s)",
        num(&burst["connections"]),
        num(&burst["size"]),
        num(&burst["read_s"]),
    );
    let factor = num(&burst["return_factor"]);
    let back = match burst["return_s"].as_f64() {
        Some(s) => format!("within {factor}× of idle after {s:.1} s"),
        None => format!(
            "not within {factor}× of idle after {} s",
            num(&burst["return_limit_s"])
        ),
    };
    println!(
        "    RSS             idle {}, peak {}, after closing {} ({:.2} × idle, {back})",
        mib(&burst["rss_idle_bytes"]),
        mib(&burst["rss_peak_bytes"]),
        mib(&burst["rss_after_bytes"]),
        burst["after_over_idle"].as_f64().unwrap_or(f64::NAN),
    );
    if burst["connections_closed"] != true {
        println!("    (the server still counted some of the burst's connections after 15 s)");
    }
}

/// Prints the storm scenario: the join phase, and the leave phase if run.
fn print_storm(j: &Value) {
    let p = &j["parameters"];
    println!(
        "msgc-loadgen storm: {} clients join one group over {} server(s) ({} backend, {} shards), events {}, {} opening at once",
        num(&p["clients"]),
        p["servers"].as_array().map_or(0, Vec::len),
        j["io_backend"].as_str().unwrap_or("?"),
        num(&j["shards"]),
        p["events"].as_str().unwrap_or("?"),
        num(&p["parallel"]),
    );
    let join = &j["join"];
    println!(
        "  join         wall {} s (all acknowledged after {} s, {} joins/s); done {}/{}, failed {}{}",
        num2(&join["wall_s"]),
        num2(&join["acked_s"]),
        num(&join["joins_per_sec"]),
        num(&join["done"]),
        num(&join["members"]),
        num(&join["failed"]),
        if join["complete"] == true { "" } else { " (INCOMPLETE)" },
    );
    println!(
        "  told         joins {} of {} owed; mismatches {} (over {}, under {}, unacknowledged {}); departures {}; before own ack {}",
        num(&join["joins_told"]),
        num(&join["joins_owed"]),
        num(&join["mismatches"]),
        num(&join["over"]),
        num(&join["under"]),
        num(&join["unacknowledged"]),
        num(&join["departures_told"]),
        num(&join["told_before_ack"]),
    );
    print_storm_servers(&join["server"], &join["loadgen_cpu_s"]);
    print_storm_errors(join);
    let leave = &j["leave"];
    if leave.is_null() {
        return;
    }
    println!(
        "  leave        {} members close at once: wall {} s (servers closed them after {} s, {} witness(es) told after {} s){}",
        num(&leave["members_closed"]),
        num2(&leave["wall_s"]),
        num2(&leave["closed_s"]),
        num(&leave["witnesses"]),
        num2(&leave["told_s"]),
        if leave["complete"] == true { "" } else { " (INCOMPLETE)" },
    );
    println!(
        "  told         witnesses: departures {} (each owed {}); mismatches {}",
        num(&leave["departures_told"]),
        num(&leave["departures_owed_each"]),
        num(&leave["mismatches"]),
    );
    print_storm_servers(&leave["server"], &leave["loadgen_cpu_s"]);
    print_storm_errors(leave);
}

/// A number with two decimals ("-" when absent).
fn num2(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.2}"))
}

/// CPU seconds, or "n/a" (given servers: not ours to measure).
fn cpu(v: &Value) -> String {
    v.as_f64().map_or("n/a".into(), |x| format!("{x:.2} s"))
}

fn print_storm_servers(s: &Value, loadgen_cpu: &Value) {
    println!(
        "  server       CPU {}; MEMBERSHIP {} + MEMBERSHIP_BATCH {} = {} frames; stuck kills {}, drops {}, slow readers {}, producer waits {}; links up {}/{}, reconnects {}",
        cpu(&s["cpu_s"]),
        num(&s["membership_frames"]),
        num(&s["membership_batches"]),
        num(&s["frames"]),
        num(&s["stuck_kills"]),
        num(&s["drops"]),
        num(&s["slow_readers"]),
        num(&s["producer_waits"]),
        num(&s["links_up"]),
        num(&s["links"]),
        num(&s["reconnects"]),
    );
    let nodes = s["per_node"].as_array().map_or(&[][..], Vec::as_slice);
    if nodes.len() > 1 {
        for n in nodes {
            println!(
                "    {:<10} CPU {}; MEMBERSHIP {} + MEMBERSHIP_BATCH {}; stuck kills {}, drops {}; links up {}/{}, reconnects {}",
                n["node"].as_str().unwrap_or("?"),
                cpu(&n["cpu_s"]),
                num(&n["membership_frames"]),
                num(&n["membership_batches"]),
                num(&n["stuck_kills"]),
                num(&n["drops"]),
                num(&n["links_up"]),
                num(&n["links"]),
                num(&n["reconnects"]),
            );
        }
    }
    println!("  loadgen      CPU {}", cpu(loadgen_cpu));
}

fn print_storm_errors(phase: &Value) {
    if let Some(errs) = phase["errors"].as_array().filter(|e| !e.is_empty()) {
        println!("  member errors: {errs:?}");
    }
}

/// Writes the HdrHistogram percentile distribution (the `.hgrm` text of
/// `outputPercentileDistribution`, 5 ticks per half distance, values in µs).
///
/// # Errors
/// When the file cannot be written.
pub fn write_hgrm(path: &Path, h: &Histogram<u64>) -> Result<()> {
    let mut out = Vec::new();
    hgrm_text(&mut out, h)?;
    std::fs::write(path, out).with_context(|| format!("cannot write {}", path.display()))
}

fn hgrm_text(out: &mut impl Write, h: &Histogram<u64>) -> std::io::Result<()> {
    const SCALE: f64 = 1000.0;
    writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    )?;
    let mut total = 0u64;
    if !h.is_empty() {
        for v in h.iter_quantiles(5) {
            total += v.count_since_last_iteration();
            let q = v.quantile_iterated_to();
            let value = v.value_iterated_to() as f64 / SCALE;
            if q < 1.0 {
                writeln!(
                    out,
                    "{value:12.3} {q:2.12} {total:10} {:14.2}",
                    1.0 / (1.0 - q)
                )?;
            } else {
                writeln!(out, "{value:12.3} {q:2.12} {total:10}")?;
            }
        }
    }
    let (mean, sd) = if h.is_empty() {
        (0.0, 0.0)
    } else {
        (h.mean() / SCALE, h.stdev() / SCALE)
    };
    writeln!(out, "#[Mean    = {mean:12.3}, StdDeviation   = {sd:12.3}]")?;
    writeln!(
        out,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        h.max() as f64 / SCALE,
        h.len()
    )?;
    let sub_buckets = (2.0 * 10f64.powi(i32::from(h.sigfig())))
        .log2()
        .ceil()
        .exp2() as u64;
    writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_buckets
    )
}

/// Plots latency by percentile (log scale of 1/(1-p)) for each series.
///
/// # Errors
/// When the SVG cannot be drawn or written.
pub fn write_plot(path: &Path, title: &str, series: &[(String, &Histogram<u64>)]) -> Result<()> {
    use plotters::prelude::*;
    let points: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .filter(|(_, h)| !h.is_empty())
        .map(|(name, h)| {
            let pts = h
                .iter_quantiles(5)
                .map(|v| {
                    (
                        v.quantile_iterated_to().min(0.999_999),
                        v.value_iterated_to() as f64 / 1000.0,
                    )
                })
                .map(|(q, us)| ((1.0 / (1.0 - q)).log10(), us))
                .collect();
            (name.clone(), pts)
        })
        .collect();
    let x_max = points
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.0))
        .fold(2.0, f64::max);
    let y_max = points
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(1.0, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    let draw = |e: &dyn std::fmt::Display| anyhow::anyhow!("plot {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max.ceil(), 0f64..y_max)
        .map_err(|e| draw(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs)")
        .x_labels(x_max.ceil() as usize + 1)
        .x_label_formatter(&|x| percentile_label(*x))
        .draw()
        .map_err(|e| draw(&e))?;
    for (i, (name, pts)) in points.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| draw(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| draw(&e))?;
    root.present().map_err(|e| draw(&e))?;
    Ok(())
}

/// `x = log10(1/(1-p))` as a percentile label: 0 → 0%, 1 → 90%, 2 → 99%…
fn percentile_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    if x < 0.5 {
        "0%".into()
    } else {
        let digits = (x.round() as usize).saturating_sub(2);
        format!("{p:.digits$}%")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::new_hist;

    #[test]
    fn hgrm_has_the_standard_shape() {
        let mut h = new_hist();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let mut out = Vec::new();
        hgrm_text(&mut out, &h).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)\n\n"));
        assert!(text.contains("#[Max     =     1000.447, Total count    =         1000]"));
        assert!(text.contains("SubBuckets     =         2048]"));
        assert_eq!(percentile_label(2.0), "99%");
        assert_eq!(percentile_label(3.0), "99.9%");
    }
}
