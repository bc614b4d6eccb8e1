//! F11: malformed input at the real binary. Broken jobs files are refused by `check-config`
//! and by `serve` with an error naming the field, never a panic, and `serve` writes nothing;
//! truncated, random and oversized gRPC messages are answered with an error code, the server
//! stays up and nothing is written. (The parsers themselves are fuzzed with proptest in
//! `crates/domain/tests/malformed_input.rs`: every field of the jobs file wrong in turn, random
//! bytes, JSON and cron text.)

use std::process::Command;

use batch_e2e::{Server, client};
use batch_proto::batch::v1 as pb;
use batch_testkit::{Backend, TestDatabase};
use bytes::{Buf, BufMut};
use prost::Message;
use sea_orm::{ConnectionTrait, Database};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use super::{Report, next, one_at_a_time, seed};

/// A codec that sends and receives raw bytes, so a test can put anything on the wire.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = buf.copy_to_bytes(buf.remaining());
        Ok(Some(bytes.to_vec()))
    }
}

/// Sends `body` as the message of `method` of the batch service, as acme.
async fn raw_call(server: &Server, method: &str, body: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
    let channel = tonic::transport::Channel::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(body);
    request
        .metadata_mut()
        .insert("authorization", "Bearer acme-token-1".parse().unwrap());
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(format!(
        "/agent.batch.v1.BatchService/{method}"
    ))
    .unwrap();
    grpc.unary(request, path, Raw)
        .await
        .map(tonic::Response::into_inner)
}

/// The jobs of acme the server knows.
async fn acme_jobs(server: &Server) -> Vec<String> {
    client(server, Some("acme-token-1"))
        .await
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs
        .into_iter()
        .map(|j| j.job_id)
        .collect()
}

/// A jobs file: the repository's, with `edit` applied to its first job.
fn broken_file(
    dir: &std::path::Path,
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> std::path::PathBuf {
    let mut jobs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(batch_e2e::repo("config/jobs.json")).unwrap(),
    )
    .unwrap();
    edit(&mut jobs["jobs"][0]);
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec(&jobs).unwrap()).unwrap();
    path
}

/// F11 at the binary: broken jobs files and malformed gRPC messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f11_malformed_input_is_refused_clearly_and_writes_nothing() {
    let _serial = one_at_a_time().await;
    let initial = seed();
    let mut seed = initial;
    eprintln!("F11 seed {initial}");
    let dir = std::env::temp_dir().join(format!("batch-faults-f11-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Broken jobs files: (file, what the error must name).
    let cases = [
        (
            broken_file(&dir, "concurrency", |j| {
                j["execution"]["concurrency"] = (-3).into()
            }),
            "concurrency",
        ),
        (
            broken_file(&dir, "type", |j| j["type"] = "SOMETIMES_USERS".into()),
            "type",
        ),
        (
            broken_file(&dir, "timezone", |j| {
                j["schedule"] = serde_json::json!({"frequency": "daily", "at": "25:61", "timezone": "Mars/Olympus"});
            }),
            "schedule",
        ),
        (
            broken_file(&dir, "missing", |j| {
                j.as_object_mut().unwrap().remove("tenant");
            }),
            "tenant",
        ),
    ];
    let truncated = dir.join("truncated.json");
    let text = std::fs::read_to_string(batch_e2e::repo("config/jobs.json")).unwrap();
    std::fs::write(&truncated, &text[..text.len() / 2]).unwrap();
    for (file, field) in cases
        .iter()
        .map(|(f, n)| (f.clone(), *n))
        .chain([(truncated, "line")])
    {
        let checked = Command::new(batch_e2e::binary())
            .arg("check-config")
            .arg(&file)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&checked.stderr).into_owned()
            + &String::from_utf8_lossy(&checked.stdout);
        assert!(
            !checked.status.success(),
            "{} passed check-config",
            file.display()
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.contains(field), "{}: {stderr}", file.display());
        // serve refuses the file too, and writes nothing into its database.
        let db = TestDatabase::create(Backend::Sqlite).await.ok().unwrap();
        let served = Command::new(batch_e2e::binary())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                &db.url,
            ])
            .arg("--jobs")
            .arg(&file)
            .env("BATCH_TOKENS", batch_e2e::TOKENS)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&served.stderr);
        assert!(
            !served.status.success(),
            "serve accepted {}",
            file.display()
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.contains(field), "{stderr}");
        let conn = Database::connect(db.url.as_str()).await.unwrap();
        let rows = conn
            .query_all_raw(sea_orm::Statement::from_string(
                conn.get_database_backend(),
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'jobs'",
            ))
            .await
            .unwrap();
        if !rows.is_empty() {
            let jobs = conn
                .query_all_raw(sea_orm::Statement::from_string(
                    conn.get_database_backend(),
                    "SELECT id FROM jobs",
                ))
                .await
                .unwrap();
            assert!(jobs.is_empty(), "serve wrote jobs from a broken file");
        }
        conn.close().await.unwrap();
    }
    // Malformed gRPC messages against a running server.
    let db = TestDatabase::create(Backend::Sqlite).await.ok().unwrap();
    let server = Server::start(&db.url, None, &[]);
    let before = acme_jobs(&server).await;
    let valid = pb::CreateJobRequest {
        definition: Some(batch_proto::json::value_to_struct(&serde_json::json!({
            "id": "wire-job", "tenant": "acme", "type": "INDIVIDUAL_USERS", "template": "digest",
            "source": {"users": {"ids": ["u001"]}},
        }))),
    }
    .encode_to_vec();
    let mut answers = Vec::new();
    for cut in [1, valid.len() / 3, valid.len() / 2, valid.len() - 1] {
        answers.push(raw_call(&server, "CreateJob", valid[..cut].to_vec()).await);
    }
    for _ in 0..20 {
        let len = usize::try_from(next(&mut seed) % 256).unwrap();
        let garbage: Vec<u8> = (0..len)
            .map(|_| u8::try_from(next(&mut seed) % 256).unwrap())
            .collect();
        for method in ["CreateJob", "GetRun", "TriggerJob", "ListRunItems"] {
            answers.push(raw_call(&server, method, garbage.clone()).await);
        }
    }
    for answer in &answers {
        // A random message may decode as a (meaningless) valid one: then it must be refused
        // on its content. Anything is fine but a success that creates something.
        if let Err(status) = answer {
            assert!(
                matches!(
                    status.code(),
                    Code::Internal
                        | Code::InvalidArgument
                        | Code::NotFound
                        | Code::PermissionDenied
                        | Code::FailedPrecondition
                ),
                "{status:?}"
            );
        }
    }
    let oversized = raw_call(&server, "CreateJob", vec![0x0a; 5 * 1024 * 1024]).await;
    // tonic answers OUT_OF_RANGE for a message above the server's 4 MiB decoding limit.
    assert!(
        matches!(
            oversized.as_ref().map_err(tonic::Status::code),
            Err(Code::OutOfRange | Code::ResourceExhausted)
        ),
        "{oversized:?}"
    );
    // Still up, and nothing was written.
    assert_eq!(acme_jobs(&server).await, before);
    // The valid message itself is accepted: the wire path works.
    raw_call(&server, "CreateJob", valid).await.unwrap();
    assert_eq!(acme_jobs(&server).await.len(), before.len() + 1);
    let mut report = Report::new("F11");
    report.seed = Some(initial);
    report.holds();
    assert!(server.terminate().success());
    let _ = std::fs::remove_dir_all(&dir);
}
