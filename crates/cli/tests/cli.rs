//! `batchctl` as a process, without a server (the end-to-end tests in `tests/` drive it
//! against a real one).

use std::process::Command;

#[test]
fn an_unreachable_server_is_named_and_exits_2() {
    let output = Command::new(env!("CARGO_BIN_EXE_batchctl"))
        .args(["--server", "http://127.0.0.1:1", "jobs", "list"])
        .env_remove("BATCH_SERVER")
        .env_remove("BATCH_TOKEN")
        .output()
        .expect("batchctl runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("connecting to http://127.0.0.1:1"),
        "{stderr}"
    );
}

#[test]
fn a_bad_parameter_is_named() {
    let output = Command::new(env!("CARGO_BIN_EXE_batchctl"))
        .args(["--server", "not a url", "jobs", "list"])
        .env_remove("BATCH_TOKEN")
        .output()
        .expect("batchctl runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--server \"not a url\""), "{stderr}");
}
