//! Project automation for agent-batch, run as `cargo xtask <command>`:
//!
//! * `test` — everything CI checks: formatting, clippy with warnings denied, and every test of
//!   the workspace (the tidy checks in this crate included);
//! * `codegen` — rewrites generated files that are committed (`config/jobs.schema.json`);
//! * `deny` — cargo-deny's licenses, bans and sources checks (advisories need the network);
//! * `faults` — the fault scenarios of issue 9 against the real binaries, with a summary;
//! * `bench` — the benchmarks of issue 8 (release build), with `target/bench/summary.json`.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

mod bench;
#[cfg(test)]
mod tidy;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    match args.first().map(String::as_str) {
        Some("test") => test(&root),
        Some("codegen") => codegen(&root),
        Some("deny") => deny(&root),
        Some("faults") => faults(&root, &args[1..]),
        Some("bench") => bench::run(&root, &args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 commands:\n  \
                 test     fmt check, clippy -D warnings, all workspace tests (tidy included)\n  \
                 codegen  rewrite committed generated files (config/jobs.schema.json)\n  \
                 deny     cargo deny check licenses bans sources\n  \
                 faults   the fault scenarios against the real server [--repeat N] [--only F1,F3] [--items N] [--seed S]\n  \
                 bench    the benchmarks of issue 8 [--quick] [--only P1,P4]; writes target/bench/summary.json"
            );
            bail!("unknown or missing command {:?}", args.first());
        }
    }
}

/// The workspace root: the parent of this crate's directory.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs `cargo` with `args` in `root`, failing when it fails.
fn cargo(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("starting cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn test(root: &Path) -> anyhow::Result<()> {
    check_postgres()?;
    cargo(root, &["fmt", "--all", "--", "--check"])?;
    cargo(
        root,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    let (passed, failed) = cargo_test(root, &["test", "--workspace", "--locked"])?;
    if passed == 0 {
        bail!("no test ran");
    }
    // One closing line for the whole workspace, printed last: cargo prints one per test binary,
    // the last of which is often an empty doc-test run.
    println!("{passed} passed, {failed} failed");
    Ok(())
}

/// Runs `cargo test` with `args`, echoing its output, and adds up its `test result:` lines.
fn cargo_test(root: &Path, args: &[&str]) -> anyhow::Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    eprintln!("$ cargo {}", args.join(" "));
    let mut child = Command::new(&cargo)
        .args(args)
        .current_dir(root)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting cargo {}", args.join(" ")))?;
    let (mut passed, mut failed) = (0, 0);
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.context("reading cargo test output")?;
            println!("{line}");
            if let Some(counts) = line.strip_prefix("test result: ") {
                passed += count_before(counts, " passed");
                failed += count_before(counts, " failed");
            }
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok((passed, failed))
}

/// The number just before `label` in `ok. 50 passed; 0 failed; …`.
fn count_before(text: &str, label: &str) -> u64 {
    text.find(label)
        .and_then(|end| text[..end].rsplit([' ', '.']).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The PostgreSQL server tests use. Under CI an unreachable server is an error, not a skip;
/// on a developer machine it is a warning, and the suites that need it say so.
fn check_postgres() -> anyhow::Result<()> {
    let url = std::env::var("BATCH_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let reachable = Command::new("pg_isready")
        .args(["-d", &url, "-t", "10"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    match (reachable, std::env::var_os("CI").is_some()) {
        (true, _) => Ok(()),
        (false, true) => bail!("PostgreSQL at {url} is not answering, and CI requires it"),
        (false, false) => {
            eprintln!("warning: PostgreSQL at {url} is not answering");
            Ok(())
        }
    }
}

/// The path of the committed JSON Schema of the jobs file.
fn schema_path(root: &Path) -> PathBuf {
    root.join("config/jobs.schema.json")
}

/// The JSON Schema of the jobs file as it must be committed: pretty JSON with a final newline.
fn schema_text() -> anyhow::Result<String> {
    let schema = batch_domain::config::json_schema();
    Ok(serde_json::to_string_pretty(&schema).context("encoding the jobs schema")? + "\n")
}

fn codegen(root: &Path) -> anyhow::Result<()> {
    let path = schema_path(root);
    std::fs::write(&path, schema_text()?).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// Runs the fault scenarios (`tests/tests/faults.rs`) against the real binaries, collects
/// their `FAULT-REPORT` lines into `target/faults/summary.json` and prints a table; `cargo xtask
/// test` runs them once as part of the workspace tests.
fn faults(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let mut only = Vec::new();
    let mut repeat = 1;
    let mut env = Vec::new();
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let value = rest
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .with_context(|| format!("{flag} {value:?} is not a whole number"))
        };
        match flag.as_str() {
            "--repeat" => repeat = number()?.max(1),
            "--items" => env.push(("FAULTS_ITEMS", number()?.to_string())),
            "--seed" => env.push(("FAULTS_SEED", number()?.to_string())),
            "--only" => only = scenario_filters(value)?,
            other => bail!(
                "unknown faults option {other:?} (--repeat N, --only F1,F3, --items N, --seed S)"
            ),
        }
    }
    // The scenarios start the real binaries: `cargo test -p batch-e2e` alone does not build
    // them (found on a clean clone).
    cargo(
        root,
        &["build", "--locked", "-p", "batch-server", "-p", "batchctl"],
    )?;
    let mut reports = Vec::new();
    let mut failed = Vec::new();
    for round in 1..=repeat {
        eprintln!("== fault scenarios, repeat {round} of {repeat}");
        let (ok, mut found) = fault_round(root, &only, &env)?;
        reports.append(&mut found);
        if !ok {
            failed.push(round);
        }
    }
    let dir = root.join("target/faults");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let summary = dir.join("summary.json");
    std::fs::write(
        &summary,
        serde_json::to_string_pretty(&serde_json::json!({
            "repeats": repeat,
            "failed_repeats": failed,
            "reports": reports,
        }))?,
    )
    .with_context(|| format!("writing {}", summary.display()))?;
    print!("{}", fault_table(&reports));
    eprintln!("wrote {}", summary.display());
    if !failed.is_empty() {
        bail!("the fault scenarios failed in repeat(s) {failed:?}");
    }
    let short = missing_reports(&only, repeat, &reports);
    if !short.is_empty() {
        // A scenario that found no database skips and still passes: not evidence.
        bail!("too few reports (a scenario skipped; see its output): {short}");
    }
    Ok(())
}

/// The selected scenarios (`only` as filters `f3_`, or all eleven) that reported fewer times
/// than `repeat`, as `F3 19 of 20`.
fn missing_reports(only: &[String], repeat: u64, reports: &[serde_json::Value]) -> String {
    let selected: Vec<String> = if only.is_empty() {
        (1..=11).map(|n| format!("F{n}")).collect()
    } else {
        only.iter()
            .map(|filter| filter.trim_end_matches('_').to_uppercase())
            .collect()
    };
    selected
        .iter()
        .filter_map(|scenario| {
            let count = reports
                .iter()
                .filter(|r| r["scenario"].as_str() == Some(scenario))
                .count() as u64;
            (count < repeat).then(|| format!("{scenario} {count} of {repeat}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs the scenarios once; returns whether they passed, and their reports.
fn fault_round(
    root: &Path,
    only: &[String],
    env: &[(&str, String)],
) -> anyhow::Result<(bool, Vec<serde_json::Value>)> {
    use std::io::{BufRead, BufReader};
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    command
        .args([
            "test",
            "--locked",
            "-p",
            "batch-e2e",
            "--test",
            "faults",
            "--",
        ])
        .args(["--test-threads", "1", "--nocapture"])
        .args(only)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(root)
        .stdout(std::process::Stdio::piped());
    eprintln!(
        "$ cargo test -p batch-e2e --test faults -- --test-threads 1 {}",
        only.join(" ")
    );
    let mut child = command.spawn().context("starting cargo test")?;
    let mut reports = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.context("reading the fault scenarios' output")?;
            println!("{line}");
            // The harness may print `test … ... ` on the same line first.
            if let Some(json) = line
                .find("FAULT-REPORT ")
                .map(|at| &line[at + "FAULT-REPORT ".len()..])
            {
                reports.push(
                    serde_json::from_str::<serde_json::Value>(json)
                        .with_context(|| format!("a malformed report: {json}"))?,
                );
            }
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    Ok((status.success(), reports))
}

/// `F1,F3` as the test-name filters `f1_`, `f3_`.
fn scenario_filters(list: &str) -> anyhow::Result<Vec<String>> {
    list.split(',')
        .map(|id| {
            let id = id.trim();
            let number = id
                .strip_prefix(['F', 'f'])
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|n| (1..=11).contains(n))
                .with_context(|| format!("{id:?} is not a scenario (F1 … F11)"))?;
            Ok(format!("f{number}_"))
        })
        .collect()
}

/// One line per scenario: how many repeats, and the worst of each figure over them.
fn fault_table(reports: &[serde_json::Value]) -> String {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;
    const FIGURES: [&str; 7] = [
        "missed",
        "extra",
        "redelivered",
        "effective_duplicates",
        "lost_results",
        "cross_tenant_rows",
        "recovery_s",
    ];
    let mut worst: BTreeMap<String, (usize, [f64; 7])> = BTreeMap::new();
    for report in reports {
        let scenario = report["scenario"].as_str().unwrap_or("?").to_owned();
        let entry = worst.entry(scenario).or_insert((0, [0.0; 7]));
        entry.0 += 1;
        for (i, figure) in FIGURES.iter().enumerate() {
            let value = report[*figure].as_f64().unwrap_or(0.0);
            entry.1[i] = entry.1[i].max(value);
        }
    }
    let mut table = format!("{:<9} {:>7}", "scenario", "repeats");
    for figure in FIGURES {
        let _ = write!(table, " {figure:>20}");
    }
    table.push('\n');
    for (scenario, (repeats, values)) in worst {
        let _ = write!(table, "{scenario:<9} {repeats:>7}");
        for value in values {
            let _ = write!(table, " {value:>20.1}");
        }
        table.push('\n');
    }
    table
}

fn deny(root: &Path) -> anyhow::Result<()> {
    let installed = Command::new("cargo")
        .args(["deny", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !installed {
        bail!(
            "cargo-deny is not installed: run `cargo install cargo-deny --locked` (about 6 minutes)"
        );
    }
    cargo(root, &["deny", "check", "licenses", "bans", "sources"])
}
