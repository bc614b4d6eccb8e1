//! Helpers of the end-to-end tests: start the real `batch-server` binary on port 0 with a
//! fresh database, wait for its address, connect the generated client with a bearer token (or
//! run the real `batchctl` against it), and stop it with SIGTERM.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use batch_proto::batch::v1::batch_service_client::BatchServiceClient;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The repository root.
pub fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// The `batch-server` binary cargo built next to this test.
///
/// # Panics
/// When it has not been built (`cargo test --workspace` builds it).
pub fn binary() -> PathBuf {
    built("batch-server")
}

/// The `batchctl` binary cargo built next to this test.
///
/// # Panics
/// When it has not been built (`cargo test --workspace` builds it).
pub fn batchctl() -> PathBuf {
    built("batchctl")
}

fn built(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("locating the test binary: {e}"));
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap_or_else(|| panic!("the test binary {} has no target directory", exe.display()));
    let binary = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.exists(),
        "{} is missing: build it with cargo build -p {name} (cargo test --workspace does)",
        binary.display()
    );
    binary
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// The tokens every test server knows.
pub const TOKENS: &str = "acme-token-1=acme,globex-token-1=globex,operator-token=*";

impl Server {
    /// Starts `batch-server serve` on 127.0.0.1:0 with `database_url`, the jobs file `jobs`
    /// (the repository's when `None`), the repository's templates and sample data, the test
    /// tokens, and `extra` arguments.
    ///
    /// # Panics
    /// When it does not print its address within 60 seconds.
    pub fn start(database_url: &str, jobs: Option<&std::path::Path>, extra: &[&str]) -> Server {
        let jobs = jobs.map_or_else(|| repo("config/jobs.json"), std::path::Path::to_path_buf);
        let mut child = Command::new(binary())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                database_url,
            ])
            .arg("--jobs")
            .arg(jobs)
            .arg("--templates")
            .arg(repo("config/templates"))
            .arg("--sample-data")
            .arg(repo("config/sample-data"))
            .args(["--tick-ms", "100"])
            .args(extra)
            .env("BATCH_TOKENS", TOKENS)
            .env("RUST_LOG", "warn,batch_server=info")
            .env_remove("BATCH_DATABASE_URL")
            .env_remove("BATCH_JOBS_FILE")
            .env_remove("BATCH_REQUEST_ENDPOINT")
            .env_remove("BATCH_TEMPLATE_ENDPOINT")
            .env_remove("BATCH_PREFERENCE_ENDPOINT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting batch-server: {e}"));
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(line);
                }
            });
        }
        let stdout = child
            .stdout
            .take()
            .unwrap_or_else(|| panic!("batch-server has no stdout"));
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("batch-server listening on ") {
                    let _ = sender.send(addr.to_owned());
                }
            }
        });
        let addr = match receiver.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let log = log
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .join("\n");
                panic!("batch-server did not start:\n{log}");
            }
        };
        Server {
            child,
            url: format!("http://{addr}"),
            log,
        }
    }

    /// What the server wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .join("\n")
    }

    /// Sends SIGTERM and waits for the exit status (at most 60 seconds).
    ///
    /// # Panics
    /// When the server does not exit in time.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "batch-server ignored SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Server {
    /// Its exit status when it has exited (by itself: a crash, say), `None` while it runs.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The server's process id, for signals a test sends itself (SIGSTOP and SIGCONT freeze
    /// and thaw a replica).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server with SIGKILL, as a crash would, and waits for it to be gone.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Adds a bearer token to every call.
#[derive(Clone, Debug)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// A client of `server` presenting `token` (none for `None`).
///
/// # Panics
/// When the server cannot be reached.
pub async fn client(
    server: &Server,
    token: Option<&str>,
) -> BatchServiceClient<InterceptedService<Channel, Bearer>> {
    let channel = Channel::from_shared(server.url.clone())
        .unwrap_or_else(|e| panic!("{e}"))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", server.url));
    let bearer = Bearer(token.map(|t| {
        format!("Bearer {t}")
            .parse()
            .unwrap_or_else(|e| panic!("token header: {e}"))
    }));
    BatchServiceClient::with_interceptor(channel, bearer)
}
