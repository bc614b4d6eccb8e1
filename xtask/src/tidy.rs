//! Tidy checks: the rules of ARCHITECTURE.md and CONVENTIONS.md that a test can hold, read from
//! `cargo metadata` and the sources.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::{schema_path, schema_text, workspace_root};

/// Which workspace crates each workspace crate may depend on (normal and build dependencies).
/// A crate missing here fails the test: add it, with its place in the layers.
const ALLOWED_WORKSPACE_EDGES: &[(&str, &[&str])] = &[
    ("batch-domain", &[]),
    ("batch-ports", &["batch-domain"]),
    ("batch-proto", &[]),
    ("batch-migration", &[]),
    (
        "batch-store",
        &["batch-domain", "batch-ports", "batch-migration"],
    ),
    (
        "batch-clients",
        &["batch-domain", "batch-ports", "batch-proto"],
    ),
    ("batch-app", &["batch-domain", "batch-ports"]),
    (
        "batch-server",
        &[
            "batch-domain",
            "batch-ports",
            "batch-proto",
            "batch-migration",
            "batch-store",
            "batch-clients",
            "batch-app",
        ],
    ),
    ("batchctl", &["batch-proto"]),
    // Dev-only crates: fakes and fixtures for tests; nothing ships them.
    (
        "batch-testkit",
        &[
            "batch-domain",
            "batch-ports",
            "batch-proto",
            "batch-migration",
            "batch-store",
        ],
    ),
    ("batch-e2e", &["batch-proto", "batch-testkit"]),
    // The benchmarks wire the processor themselves, as the server does, around the fakes.
    (
        "batch-bench",
        &[
            "batch-domain",
            "batch-ports",
            "batch-proto",
            "batch-store",
            "batch-clients",
            "batch-app",
            "batch-testkit",
        ],
    ),
    ("xtask", &["batch-domain"]),
];

/// Crates that may use the database, gRPC or protobuf libraries (normal dependencies).
const ADAPTER_CRATES: &[&str] = &[
    "batch-proto",
    "batch-migration",
    "batch-store",
    "batch-clients",
    "batch-server",
    "batchctl",
    "batch-testkit",
    "batch-e2e",
    "batch-bench",
];

/// Third-party crates only adapters may use.
const ADAPTER_ONLY: &[&str] = &[
    "sea-orm",
    "sea-orm-migration",
    "sea-query",
    "sqlx",
    "tonic",
    "tonic-prost",
    "tonic-health",
    "tonic-reflection",
    "prost",
    "prost-types",
];

/// Crates that must stay free of any async runtime.
const NO_RUNTIME: &[&str] = &["batch-domain"];
const RUNTIME_CRATES: &[&str] = &["tokio", "async-trait", "futures", "async-std"];

/// Crates only tests may depend on.
const DEV_ONLY: &[&str] = &["batch-testkit"];

/// Measurement harnesses: binaries nothing ships, built around the test fakes, so they may use
/// the dev-only crates as normal dependencies.
const HARNESSES: &[&str] = &["batch-bench"];

struct Package {
    name: String,
    manifest: PathBuf,
    /// (dependency name, kind) with kind `normal`, `dev` or `build`.
    dependencies: Vec<(String, String)>,
    roots: Vec<PathBuf>,
    publish_false: bool,
}

fn workspace_packages() -> Vec<Package> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(workspace_root())
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: Value = serde_json::from_slice(&output.stdout).expect("metadata is JSON");
    metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| Package {
            name: p["name"].as_str().unwrap_or_default().to_owned(),
            manifest: PathBuf::from(p["manifest_path"].as_str().unwrap_or_default()),
            dependencies: p["dependencies"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|d| {
                    (
                        d["name"].as_str().unwrap_or_default().to_owned(),
                        d["kind"].as_str().unwrap_or("normal").to_owned(),
                    )
                })
                .collect(),
            roots: p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|t| {
                    t["kind"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|k| k == "lib" || k == "bin" || k == "proc-macro")
                })
                .map(|t| PathBuf::from(t["src_path"].as_str().unwrap_or_default()))
                .collect(),
            publish_false: p["publish"].as_array().is_some_and(Vec::is_empty),
        })
        .collect()
}

fn allowed_edges() -> BTreeMap<&'static str, BTreeSet<&'static str>> {
    ALLOWED_WORKSPACE_EDGES
        .iter()
        .map(|(name, deps)| (*name, deps.iter().copied().collect()))
        .collect()
}

#[test]
fn workspace_crates_depend_only_along_the_allowed_edges() {
    let packages = workspace_packages();
    let members: BTreeSet<String> = packages.iter().map(|p| p.name.clone()).collect();
    let allowed = allowed_edges();
    let mut violations = Vec::new();
    for package in &packages {
        let Some(allowed) = allowed.get(package.name.as_str()) else {
            violations.push(format!(
                "{} is not in the tidy layer table (xtask/src/tidy.rs)",
                package.name
            ));
            continue;
        };
        for (dep, kind) in &package.dependencies {
            if kind == "dev" {
                continue;
            }
            if members.contains(dep) && !allowed.contains(dep.as_str()) {
                violations.push(format!("{} must not depend on {dep}", package.name));
            }
            if ADAPTER_ONLY.contains(&dep.as_str())
                && !ADAPTER_CRATES.contains(&package.name.as_str())
            {
                violations.push(format!(
                    "{} must not depend on {dep}: only adapters, proto, migrations and the server may",
                    package.name
                ));
            }
            if NO_RUNTIME.contains(&package.name.as_str()) && RUNTIME_CRATES.contains(&dep.as_str())
            {
                violations.push(format!(
                    "{} must stay free of async runtimes but uses {dep}",
                    package.name
                ));
            }
            if DEV_ONLY.contains(&dep.as_str()) && !HARNESSES.contains(&package.name.as_str()) {
                violations.push(format!(
                    "{} may use {dep} only as a dev-dependency",
                    package.name
                ));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "layering violations:\n  {}",
        violations.join("\n  ")
    );
}

/// The first lines of a crate root, after blank lines.
fn leading_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_crate_root_has_a_doc_paragraph_and_forbids_unsafe_code() {
    let mut problems = Vec::new();
    for package in workspace_packages() {
        for root in &package.roots {
            let lines = leading_lines(root);
            let first = lines.iter().find(|l| !l.trim().is_empty());
            if !first.is_some_and(|l| l.starts_with("//!")) {
                problems.push(format!(
                    "{} does not start with a //! paragraph",
                    root.display()
                ));
            }
            if !lines.iter().any(|l| l.trim() == "#![forbid(unsafe_code)]") {
                problems.push(format!("{} lacks #![forbid(unsafe_code)]", root.display()));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_manifest_uses_workspace_lints_and_is_not_published() {
    let mut problems = Vec::new();
    for package in workspace_packages() {
        let text = std::fs::read_to_string(&package.manifest).expect("manifest readable");
        if !text.contains("[lints]\nworkspace = true") {
            problems.push(format!(
                "{}: add [lints] workspace = true",
                package.manifest.display()
            ));
        }
        if !package.publish_false {
            problems.push(format!(
                "{}: set publish = false (publish.workspace = true)",
                package.manifest.display()
            ));
        }
        // Versions live in [workspace.dependencies]; members name them with `workspace = true`.
        let mut section = String::new();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('[') {
                section = line.to_owned();
                continue;
            }
            let in_dependencies = section.ends_with("dependencies]");
            if in_dependencies && line.contains("version") && !line.starts_with('#') {
                problems.push(format!(
                    "{}: {line}: put the version in [workspace.dependencies]",
                    package.manifest.display()
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_committed_jobs_schema_is_generated_from_the_rust_types() {
    let path = schema_path(&workspace_root());
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == schema_text().expect("schema encodes"),
        "{} is stale: run `cargo xtask codegen` and commit it",
        path.display()
    );
}
