//! `cargo xtask bench [--quick] [--only P1,P4]`: builds `batch-bench` and `batch-server` in
//! release mode, runs the measurements of issue 8, prints a table against the goals and writes
//! `target/bench/summary.json` as `{"results": [{"id", "value", "unit", "detail", "goal"}]}`.
//! Every figure is a ratio or a count taken within one run, never an absolute time compared
//! across runs; the criterion micro-benchmarks (`cargo bench -p batch-domain --bench hot`) are
//! run last and their means added as `micro/…` results.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// One figure of the summary.
struct Figure {
    id: String,
    value: f64,
    unit: &'static str,
    detail: String,
    /// The goal, as text (`>= 0.8`), and whether the value meets it.
    goal: Option<(&'static str, bool)>,
}

/// Runs the benchmarks.
pub(crate) fn run(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let mut quick = false;
    let mut only: Option<Vec<String>> = None;
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        match flag.as_str() {
            "--quick" => quick = true,
            "--only" => {
                let list = rest.next().context("--only needs a list such as P1,P4")?;
                only = Some(list.split(',').map(|p| p.trim().to_uppercase()).collect());
            }
            other => bail!("unknown bench option {other:?} (--quick, --only P1,P4)"),
        }
    }
    let wanted = |id: &str| only.as_ref().is_none_or(|o| o.iter().any(|p| p == id));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    eprintln!("$ cargo build --release -p batch-bench -p batch-server");
    let built = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "batch-bench",
            "-p",
            "batch-server",
        ])
        .current_dir(root)
        .status()
        .context("starting cargo build")?;
    if !built.success() {
        bail!("building the benchmarks failed ({built})");
    }
    let bench = root.join("target/release/batch-bench");
    let server = root.join("target/release/batch-server");
    let server = server.to_string_lossy().into_owned();
    let scale = |full: usize, quick_size: usize| if quick { quick_size } else { full };
    let mut figures = Vec::new();
    if wanted("P1") || wanted("P3") {
        let items = scale(100_000, 20_000).to_string();
        for backend in ["sqlite", "postgres"] {
            let line = measure(
                root,
                &bench,
                &["throughput", "--backend", backend, "--items", &items],
            )?;
            let ratio = number(&line, "processor_per_s")? / number(&line, "bare_per_s")?;
            figures.push(Figure {
                id: format!("P1-{backend}"),
                value: ratio,
                unit: "ratio",
                detail: format!(
                    "{items} items, concurrency 64, latency 0: processor {:.0}/s (prepare {:.1} s, execute {:.1} s), bare tonic loop {:.0}/s ({:.0}/s before the processor, {:.0}/s after); a call at the client {:.2} ms (bare {:.2} ms); CPU per item: processor run {:.0} µs in process + {:.0} µs in PostgreSQL, bare loop {:.0} µs; with every core busy the processor's CPU would allow {:.0}/s, {:.2} of the bare loop",
                    number(&line, "processor_per_s")?,
                    number(&line, "prepare_s")?,
                    number(&line, "execute_s")?,
                    number(&line, "bare_per_s")?,
                    number(&line, "bare_before_per_s")?,
                    number(&line, "bare_after_per_s")?,
                    number(&line, "processor_client_call_ms")?,
                    number(&line, "bare_client_call_ms")?,
                    number(&line, "processor_cpu_us_per_item")?,
                    number(&line, "database_cpu_us_per_item")?,
                    number(&line, "bare_cpu_us_per_item")?,
                    number(&line, "processor_cpu_ceiling_per_s")?,
                    number(&line, "processor_cpu_ceiling_per_s")? / number(&line, "bare_per_s")?
                ),
                goal: Some((">= 0.8", ratio >= 0.8)),
            });
            if backend == "postgres" {
                let per_item = number(&line, "statements_per_item")?;
                figures.push(Figure {
                    id: "P3".to_owned(),
                    value: per_item,
                    unit: "statements/item",
                    detail: format!(
                        "pg_stat_statements calls during the P1-postgres run ({items} items, chunks of 500)"
                    ),
                    goal: Some(("<= 0.02", per_item <= 0.02)),
                });
            }
        }
    }
    if wanted("P2") {
        let items = scale(100_000, 20_000).to_string();
        let line = measure(
            root,
            &bench,
            &[
                "throughput",
                "--backend",
                "postgres",
                "--items",
                &items,
                "--latency-ms",
                "20",
            ],
        )?;
        let ceiling = number(&line, "littles_law_per_s")?;
        let ratio = number(&line, "processor_per_s")? / ceiling;
        figures.push(Figure {
            id: "P2".to_owned(),
            value: ratio,
            unit: "ratio",
            detail: format!(
                "{items} items on PostgreSQL, latency 20 ms, concurrency 64: processor {:.0}/s (prepare {:.1} s, execute {:.1} s, {:.1} calls in flight on average), Little's law {ceiling:.0}/s, bare loop {:.0}/s ({:.1} in flight, {:.2} ms per call)",
                number(&line, "processor_per_s")?,
                number(&line, "prepare_s")?,
                number(&line, "execute_s")?,
                number(&line, "processor_mean_in_flight")?,
                number(&line, "bare_per_s")?,
                number(&line, "bare_mean_in_flight")?,
                number(&line, "bare_mean_call_ms")?
            ),
            goal: Some((">= 0.95", ratio >= 0.95)),
        });
    }
    if wanted("P4") {
        let small = scale(10_000, 10_000).to_string();
        let large = scale(1_000_000, 100_000).to_string();
        let line = measure(
            root,
            &bench,
            &[
                "memory", "--server", &server, "--small", &small, "--large", &large,
            ],
        )?;
        let growth = number(&line, "growth_mib")?;
        figures.push(Figure {
            id: "P4".to_owned(),
            value: growth,
            unit: "MiB",
            detail: format!(
                "server peak RSS {:.1} MiB after {large} items − {:.1} MiB after {small}; {:.0} bytes/item; triggering the {large}-item run took {:.1} s",
                number(&line, "large_peak_mib")?,
                number(&line, "small_peak_mib")?,
                number(&line, "bytes_per_item")?,
                number(&line, "large_trigger_s")?
            ),
            goal: Some(("<= 64", growth <= 64.0)),
        });
    }
    if wanted("P5") {
        let mut args = vec!["scheduler"];
        if quick {
            args.push("--quick");
        }
        let line = measure(root, &bench, &args)?;
        let details = [
            format!(
                "p99 of {} idle ticks with {} preference schedules (p50 {:.4} ms, max {:.4} ms)",
                line["idle_ticks"],
                line["idle_schedules"],
                number(&line, "idle_tick_p50_ms")?,
                number(&line, "idle_tick_max_ms")?
            ),
            format!(
                "first tick grouping {} preferences into {} schedules; group_by_next_fire alone {:.0} ms",
                line["group_preferences"],
                line["group_schedules"],
                number(&line, "group_pure_ms")?
            ),
            format!(
                "the tick firing {} users at one instant on SQLite (run and items written); {:.0} ms in memory",
                line["burst_users"],
                number(&line, "burst_memory_ms")?
            ),
        ];
        for ((id, field, goal_ms), detail) in [
            ("P5-idle", "idle_tick_p99_ms", 5.0),
            ("P5-group", "group_1m_ms", 1_000.0),
            ("P5-burst", "burst_10k_ms", 1_000.0),
        ]
        .into_iter()
        .zip(details)
        {
            let value = number(&line, field)?;
            figures.push(Figure {
                id: id.to_owned(),
                value,
                unit: "ms",
                detail,
                goal: Some((
                    if goal_ms < 10.0 { "< 5" } else { "< 1000" },
                    value < goal_ms,
                )),
            });
        }
    }
    if wanted("P6") {
        let items = scale(40_000, 16_000).to_string();
        let line = measure(
            root,
            &bench,
            &["replicas", "--server", &server, "--items", &items],
        )?;
        let speedup = number(&line, "speedup")?;
        figures.push(Figure {
            id: "P6".to_owned(),
            value: speedup,
            unit: "ratio",
            detail: format!(
                "{items} items in 8 jobs, latency 20 ms, 1 slot × concurrency 64 per replica: one replica {:.0}/s, two {:.0}/s",
                number(&line, "one_replica_per_s")?,
                number(&line, "two_replicas_per_s")?
            ),
            goal: Some((">= 1.8", speedup >= 1.8)),
        });
    }
    if wanted("MICRO") || only.is_none() {
        figures.extend(micro(root, &cargo, quick)?);
    }
    report(root, &figures)
}

/// Runs `batch-bench` with `args` and returns its JSON line.
fn measure(root: &Path, bench: &Path, args: &[&str]) -> anyhow::Result<Value> {
    eprintln!("$ batch-bench {}", args.join(" "));
    let out = Command::new(bench)
        .args(args)
        .current_dir(root)
        .env("RUST_LOG", "warn")
        .output()
        .with_context(|| format!("starting {}", bench.display()))?;
    if !out.status.success() {
        bail!(
            "batch-bench {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("batch-bench {} printed no result", args.join(" ")))?;
    eprintln!("  {line}");
    serde_json::from_str(line).with_context(|| format!("a malformed result: {line}"))
}

/// A number field of a result line.
fn number(line: &Value, field: &str) -> anyhow::Result<f64> {
    line[field]
        .as_f64()
        .with_context(|| format!("no number {field:?} in {line}"))
}

/// The criterion micro-benchmarks: their mean times from `target/criterion`.
fn micro(root: &Path, cargo: &str, quick: bool) -> anyhow::Result<Vec<Figure>> {
    let mut args = vec!["bench", "--locked", "-p", "batch-domain", "--bench", "hot"];
    if quick {
        args.extend(["--", "--quick"]);
    }
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(cargo)
        .args(&args)
        .current_dir(root)
        .status()
        .context("starting cargo bench")?;
    if !status.success() {
        bail!("the micro-benchmarks failed ({status})");
    }
    let mut figures = Vec::new();
    let dir = root.join("target/criterion");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(figures);
    };
    let mut names: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    names.sort();
    for path in names {
        let estimates = path.join("new/estimates.json");
        let Ok(text) = std::fs::read_to_string(&estimates) else {
            continue;
        };
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("reading {}", estimates.display()))?;
        let Some(mean) = value["mean"]["point_estimate"].as_f64() else {
            continue;
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        figures.push(Figure {
            id: format!("micro/{name}"),
            value: mean,
            unit: "ns",
            detail: "criterion mean".to_owned(),
            goal: None,
        });
    }
    Ok(figures)
}

/// Prints the table and writes `target/bench/summary.json`.
fn report(root: &Path, figures: &[Figure]) -> anyhow::Result<()> {
    println!(
        "{:<24} {:>14} {:<16} {:<10} detail",
        "id", "value", "unit", "goal"
    );
    for f in figures {
        let goal = f.goal.map_or_else(String::new, |(text, met)| {
            format!("{text}{}", if met { "" } else { " ✗" })
        });
        println!(
            "{:<24} {:>14.4} {:<16} {:<10} {}",
            f.id, f.value, f.unit, goal, f.detail
        );
    }
    let results: Vec<Value> = figures
        .iter()
        .map(|f| {
            json!({
                "id": f.id,
                "value": f.value,
                "unit": f.unit,
                "detail": f.detail,
                "goal": f.goal.map(|(text, _)| text),
                "meets_goal": f.goal.map(|(_, met)| met),
            })
        })
        .collect();
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("summary.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json!({ "results": results }))?,
    )
    .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
