//! Mutual TLS: callers known by their client certificate.

#![allow(clippy::unwrap_used)]

use batch_e2e::{Server, TOKENS};
use batch_proto::batch::v1 as pb;
use batch_proto::batch::v1::batch_service_client::BatchServiceClient;
use batch_testkit::{Backend, TestDatabase};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use sha2::Digest;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_identifies_its_tenant_and_none_is_refused() {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client_cert = CertificateParams::new(vec!["reporting.acme".to_owned()])
        .unwrap()
        .signed_by(&client_key, &ca)
        .unwrap();
    let dir = std::env::temp_dir().join(format!("batch-e2e-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    };
    let ca_pem = ca.pem();
    let ca_file = write("ca.pem", &ca_pem);
    let cert_file = write("server.pem", &server_cert.pem());
    let key_file = write("server.key", &server_key.serialize_pem());
    let fingerprint: String = sha2::Sha256::digest(client_cert.der())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let tokens = format!("{TOKENS},cert-sha256:{fingerprint}=acme");
    let db = TestDatabase::create(Backend::Sqlite).await.unwrap();
    let server = Server::start(
        &db.url,
        None,
        &[
            "--tokens",
            &tokens,
            "--tls-cert",
            &cert_file,
            "--tls-key",
            &key_file,
            "--tls-client-ca",
            &ca_file,
        ],
    );
    let address = server.url.replace("http://", "https://");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca_pem))
        .domain_name("localhost");
    let channel = Channel::from_shared(address.clone())
        .unwrap()
        .tls_config(tls.clone().identity(Identity::from_pem(
            client_cert.pem(),
            client_key.serialize_pem(),
        )))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let jobs = BatchServiceClient::new(channel)
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(!jobs.is_empty());
    assert!(
        jobs.iter().all(|j| j.tenant_id == "acme"),
        "the certificate is acme's"
    );
    // Without a client certificate the handshake (or the first call) fails.
    let anonymous = async {
        let channel = Channel::from_shared(address.clone())
            .unwrap()
            .tls_config(tls.clone())
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        BatchServiceClient::new(channel)
            .list_jobs(pb::ListJobsRequest {})
            .await
            .map_err(|e| e.to_string())
    };
    assert!(
        anonymous.await.is_err(),
        "a caller without a certificate got in"
    );
    assert!(server.terminate().success());
    let _ = std::fs::remove_dir_all(&dir);
}
