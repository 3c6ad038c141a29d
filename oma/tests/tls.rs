//! The OMA over TLS, with certificates made at test time: it serves HTTPS and requires client
//! certificates when told to, calls HTTPS VMAs trusting its configured CA only, refuses to
//! register an https:// VMA it could not verify, and re-reads tokens and certificates in place.

mod common;

use common::vma::{StandInVma, StartMode, pid};
use common::{OPERATOR, settings, start_server};
use oma::server::NetSettings;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;
use test_support::KillOnDrop;
use test_support::pki::{TestCa, TwoCas};
use transport::{ClientTlsFiles, ServerTls, ServerTlsFiles};

type Pki = TwoCas;

fn pki() -> Pki {
    TwoCas::new().unwrap()
}

fn https_client(files: &ClientTlsFiles) -> reqwest::Client {
    files
        .apply(reqwest::Client::builder())
        .unwrap()
        .build()
        .unwrap()
}

fn mutual(pki: &Pki) -> NetSettings {
    let server = pki.ca.server("oma").unwrap();
    NetSettings {
        tls: Some(ServerTlsFiles {
            cert: server.cert,
            key: server.key,
            client_ca: Some(pki.ca.cert.clone()),
        }),
        ..NetSettings::default()
    }
}

#[tokio::test]
async fn the_oma_serves_https_to_clients_with_a_certificate_of_its_ca_only() {
    let pki = pki();
    let db = common::sqlite_db();
    let mut s = settings(&db);
    s.net = mutual(&pki);
    let server = start_server(s).await;
    let url = format!("https://127.0.0.1:{}/api/v1/jobs", server.addr.port());
    let operator = pki.ca.client("operator").unwrap();
    let good = https_client(&ClientTlsFiles {
        ca: Some(pki.ca.cert.clone()),
        cert: Some(operator.cert),
        key: Some(operator.key),
    });
    let answer = good.get(&url).bearer_auth(OPERATOR).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    let no_cert = https_client(&ClientTlsFiles {
        ca: Some(pki.ca.cert.clone()),
        ..ClientTlsFiles::default()
    });
    assert!(
        no_cert
            .get(&url)
            .bearer_auth(OPERATOR)
            .send()
            .await
            .is_err()
    );
    let stranger = pki.other.client("stranger").unwrap();
    let wrong_ca = https_client(&ClientTlsFiles {
        ca: Some(pki.ca.cert.clone()),
        cert: Some(stranger.cert),
        key: Some(stranger.key),
    });
    assert!(
        wrong_ca
            .get(&url)
            .bearer_auth(OPERATOR)
            .send()
            .await
            .is_err()
    );
    let plain = reqwest::Client::new()
        .get(format!("http://{}/health", server.addr))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP on the HTTPS port");
    server.shutdown().await;
}

#[tokio::test]
async fn an_https_vma_is_called_with_the_oma_ca_and_client_certificate() {
    let pki = pki();
    let vma_cert = pki.ca.server("vma").unwrap();
    let vma = StandInVma::start_tls(
        ServerTls::load(ServerTlsFiles {
            cert: vma_cert.cert,
            key: vma_cert.key,
            client_ca: Some(pki.ca.cert.clone()),
        })
        .unwrap(),
    )
    .await;
    vma.set_start(StartMode::Run(pid(4242, 777)));
    let db = common::sqlite_db();
    // Without a CA for VMAs, an https:// VMA cannot be registered: it could never be called.
    let plain_oma = start_server(settings(&db)).await;
    let refused = register(&plain_oma, &vma.url).await;
    assert_eq!(refused.status(), 409);
    let e: api::ErrorBody = refused.json().await.unwrap();
    assert!(e.message.contains("--vma-ca"), "{}", e.message);
    plain_oma.shutdown().await;

    let identity = pki.ca.client("oma-client").unwrap();
    let mut s = settings(&db);
    s.net.vma_tls = ClientTlsFiles {
        ca: Some(pki.ca.cert.clone()),
        cert: Some(identity.cert),
        key: Some(identity.key),
    };
    let server = start_server(s).await;
    assert_eq!(register(&server, &vma.url).await.status(), 200);
    let created = reqwest::Client::new()
        .post(format!("http://{}/api/v1/jobs", server.addr))
        .bearer_auth(OPERATOR)
        .json(
            &json!({"id": "job-tls", "vm_context_id": "ctx-tls", "vm_name": "web01",
            "vma_id": "vma-1", "params": {"vm_path": "/DC/vm/web01"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201, "{:?}", created.text().await);
    let job = server.state.store.get_job("job-tls").await.unwrap().job;
    assert_eq!(
        job.pid,
        Some(4242),
        "the start went over HTTPS with mutual TLS"
    );
    server.shutdown().await;
}

async fn register(server: &oma::server::RunningServer, url: &str) -> reqwest::Response {
    reqwest::Client::new()
        .put(format!("http://{}/api/v1/vmas/vma-1", server.addr))
        .bearer_auth(OPERATOR)
        .json(&json!({"base_url": url, "token": "vma-token-for-tls-tests"}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_reload_replaces_tokens_and_certificates_and_a_bad_file_keeps_the_old_ones() {
    let pki = pki();
    let tokens = pki.dir.path().join("operator.tokens");
    std::fs::write(&tokens, "# site A\nfirst-operator-token-0001\n").unwrap();
    let db = common::sqlite_db();
    let mut s = settings(&db);
    s.operator_tokens = vec!["first-operator-token-0001".into()];
    s.net = NetSettings {
        operator_token_file: Some(tokens.clone()),
        ..mutual(&pki)
    };
    let server = start_server(s).await;
    let operator = pki.ca.client("operator").unwrap();
    let client = |ca: &TestCa| {
        https_client(&ClientTlsFiles {
            ca: Some(ca.cert.clone()),
            cert: Some(operator.cert.clone()),
            key: Some(operator.key.clone()),
        })
    };
    let url = format!("https://127.0.0.1:{}/api/v1/jobs", server.addr.port());
    let status = |c: reqwest::Client, token: &'static str| {
        let url = url.clone();
        async move {
            c.get(url)
                .bearer_auth(token)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    };
    assert_eq!(
        status(client(&pki.ca), "first-operator-token-0001")
            .await
            .unwrap(),
        200
    );
    // New token file and a server certificate of another CA (the client CA stays).
    std::fs::write(&tokens, "second-operator-token-002\n").unwrap();
    let next = pki.other.server("oma-next").unwrap();
    std::fs::copy(&next.cert, pki.ca.server_path("oma")).unwrap();
    std::fs::copy(&next.key, pki.ca.key_path("oma")).unwrap();
    server.reload().unwrap();
    assert_eq!(
        status(client(&pki.other), "second-operator-token-002")
            .await
            .unwrap(),
        200
    );
    assert_eq!(
        status(client(&pki.other), "first-operator-token-0001")
            .await
            .unwrap(),
        401
    );
    assert!(
        status(client(&pki.ca), "second-operator-token-002")
            .await
            .is_err()
    );
    // A token file with a short token is refused as a whole: the tokens in force stay.
    std::fs::write(&tokens, "x\n").unwrap();
    let err = server.reload().unwrap_err();
    assert!(err.to_string().contains("line 1"), "{err}");
    assert_eq!(
        status(client(&pki.other), "second-operator-token-002")
            .await
            .unwrap(),
        200
    );
    server.shutdown().await;
}

/// The real binaries: `oma` over HTTPS re-reads its token file on a real SIGHUP, and
/// `job-recovery` speaks HTTPS with `--ca-file` (and refuses an https:// URL without one).
#[tokio::test]
async fn sighup_reloads_the_running_oma_and_job_recovery_speaks_https() {
    let pki = pki();
    let dir = pki.dir.path();
    let tokens = dir.join("operator.tokens");
    std::fs::write(&tokens, "first-operator-token-0001\n").unwrap();
    let cert = pki.ca.server("oma").unwrap();
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_oma"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--nice",
                "0",
            ])
            .arg("--database")
            .arg(dir.join("oma.db"))
            .arg("--operator-token-file")
            .arg(&tokens)
            .arg("--tls-cert")
            .arg(&cert.cert)
            .arg("--tls-key")
            .arg(&cert.key)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (lines_tx, lines) = std::sync::mpsc::channel::<serde_json::Value>();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(serde_json::from_str(&line).unwrap_or_default());
        }
    });
    let wait_for = |message: &str| loop {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("oma logged no {message:?}"));
        if line["fields"]["message"] == message || line["fields"]["event"] == message {
            return line;
        }
    };
    let addr = wait_for("oma listening")["fields"]["addr"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = format!("https://127.0.0.1:{}", addr.rsplit(':').next().unwrap());
    let cli = |token: &str, ca: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_job-recovery"));
        cmd.args(["--oma-url", &url, "--token", token, "status"]);
        if ca {
            cmd.arg("--ca-file").arg(&pki.ca.cert);
        }
        cmd.output().unwrap()
    };
    let out = cli("first-operator-token-0001", true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli("first-operator-token-0001", false);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--ca-file"), "{stderr}");
    std::fs::write(&tokens, "second-operator-token-002\n").unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGHUP) };
    wait_for("reload_requested");
    let reloaded = wait_for("reloaded");
    assert_eq!(reloaded["fields"]["part"], "operator_tokens");
    let out = cli("second-operator-token-002", true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!cli("first-operator-token-0001", true).status.success());
}
