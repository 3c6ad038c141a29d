//! The real `vma-watchdog` over TLS, with certificates made at test time: its API is HTTPS
//! and requires a client certificate of its CA when told to, refusing the wrong CA, an
//! expired certificate and plain HTTP; migratekit's progress keeps its plain-HTTP loopback
//! listener; deaths reach an HTTPS OMA with mutual TLS; SIGHUP puts replaced certificates
//! and tokens in force without a restart.

mod common;
mod fake_oma;

use std::path::Path;
use std::time::Duration;

use common::{Standin, WatchdogProcess, privileged, secret, signal};
use fake_oma::FakeOma;
use reqwest::StatusCode;
use test_support::pki::{Pair, TestCa, TwoCas};
use transport::{ClientTlsFiles, ServerTls, ServerTlsFiles};

const API_TOKEN: &str = "api-token-0123456789";
const OMA_TOKEN: &str = "oma-token-0123456789";
const VMA_ID: &str = "vma-tls";

/// The test's CAs, with a state directory for the watchdog beside them.
struct Pki(TwoCas);

impl std::ops::Deref for Pki {
    type Target = TwoCas;

    fn deref(&self) -> &TwoCas {
        &self.0
    }
}

fn pki() -> Pki {
    let cas = TwoCas::new().unwrap();
    std::fs::create_dir(cas.dir.path().join("state")).unwrap();
    Pki(cas)
}

impl Pki {
    fn state(&self) -> std::path::PathBuf {
        self.dir.path().join("state")
    }

    fn file(&self, name: &str, text: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn client(ca: &TestCa, identity: Option<&Pair>) -> reqwest::Client {
    ClientTlsFiles {
        ca: Some(ca.cert.clone()),
        cert: identity.map(|p| p.cert.clone()),
        key: identity.map(|p| p.key.clone()),
    }
    .apply(reqwest::Client::builder().timeout(Duration::from_secs(5)))
    .unwrap()
    .build()
    .unwrap()
}

/// The watchdog's address for `event` (`api_listening`, `progress_listening`).
fn addr_of(w: &WatchdogProcess, event: &str) -> std::net::SocketAddr {
    let line = w.wait_for(event, |v| v["event"] == event);
    line["addr"].as_str().unwrap().parse().unwrap()
}

async fn jobs_status(client: &reqwest::Client, url: &str, token: &str) -> Option<StatusCode> {
    let answer = client.get(url).bearer_auth(token).send().await;
    answer.ok().map(|a| a.status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_https_for_client_certificates_of_its_ca_only_and_progress_stays_plain() {
    let pki = pki();
    let server = pki.ca.server("watchdog").unwrap();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--progress-listen",
        "127.0.0.1:0",
        "--tls-cert",
        s(&server.cert),
        "--tls-key",
        s(&server.key),
        "--tls-client-ca",
        s(&pki.ca.cert),
        "--api-token",
        API_TOKEN,
    ];
    let w = WatchdogProcess::start_with(&pki.state(), "procfs", &args, &[]);
    let api = addr_of(&w, "api_listening");
    let url = format!("https://127.0.0.1:{}/api/v1/jobs", api.port());
    let oma = pki.ca.client("oma").unwrap();
    let ok = jobs_status(&client(&pki.ca, Some(&oma)), &url, API_TOKEN).await;
    assert_eq!(ok, Some(StatusCode::OK), "the OMA with its certificate");
    let refused = [
        ("no client certificate", client(&pki.ca, None)),
        (
            "the server checked against another CA",
            client(&pki.other, Some(&oma)),
        ),
        (
            "a client certificate of another CA",
            client(&pki.ca, Some(&pki.other.client("stranger").unwrap())),
        ),
        (
            "an expired client certificate",
            client(&pki.ca, Some(&pki.ca.expired_client("old").unwrap())),
        ),
    ];
    for (what, c) in refused {
        assert_eq!(jobs_status(&c, &url, API_TOKEN).await, None, "{what}");
    }
    let plain = reqwest::Client::new();
    let plain_url = format!("http://{api}/api/v1/jobs");
    assert_eq!(
        jobs_status(&plain, &plain_url, API_TOKEN).await,
        None,
        "plain HTTP"
    );
    w.wait_for("tls_handshake_failed", |v| {
        v["event"] == "tls_handshake_failed"
    });
    // The progress listener is plain HTTP and has the progress route only: nothing behind
    // the token is reachable without TLS.
    let progress = addr_of(&w, "progress_listening");
    for path in ["/api/v1/jobs", "/health"] {
        let answer = plain
            .get(format!("http://{progress}{path}"))
            .bearer_auth(API_TOKEN);
        assert_eq!(
            answer.send().await.unwrap().status(),
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    let update = plain
        .post(format!("http://{progress}/api/v1/progress/job-x/update"))
        .json(&serde_json::json!({"stage": "Transfer", "status": "in_progress"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        update.status(),
        StatusCode::FORBIDDEN,
        "served, and refused: no such job here"
    );
    w.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_certificates_and_tokens_take_effect_on_sighup_without_a_restart() {
    let pki = pki();
    let server = pki.ca.server("watchdog").unwrap();
    let token_file = pki.file("api.token", API_TOKEN);
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--progress-listen",
        "127.0.0.1:0",
        "--tls-cert",
        s(&server.cert),
        "--tls-key",
        s(&server.key),
        "--api-token-file",
        &token_file,
    ];
    let w = WatchdogProcess::start_with(&pki.state(), "procfs", &args, &[]);
    let pid = w.pid();
    let url = format!(
        "https://127.0.0.1:{}/api/v1/jobs",
        addr_of(&w, "api_listening").port()
    );
    let old = client(&pki.ca, None);
    assert_eq!(
        jobs_status(&old, &url, API_TOKEN).await,
        Some(StatusCode::OK)
    );
    // The operator installs a certificate of another CA and a new token: nothing changes
    // until the SIGHUP.
    let new = pki.other.server("new").unwrap();
    std::fs::copy(&new.cert, &server.cert).unwrap();
    std::fs::copy(&new.key, &server.key).unwrap();
    let new_token = "api-token-rotated-987";
    pki.file("api.token", new_token);
    let fresh = client(&pki.other, None);
    assert_eq!(
        jobs_status(&fresh, &url, new_token).await,
        None,
        "before the SIGHUP"
    );
    signal(pid, libc::SIGHUP);
    w.wait_for("tls reloaded", |v| {
        v["event"] == "reloaded" && v["part"] == "tls"
    });
    w.wait_for("token reloaded", |v| {
        v["event"] == "reloaded" && v["part"] == "api_token"
    });
    let fresh = client(&pki.other, None);
    assert_eq!(
        jobs_status(&fresh, &url, new_token).await,
        Some(StatusCode::OK)
    );
    let stale = jobs_status(&fresh, &url, API_TOKEN).await;
    assert_eq!(
        stale,
        Some(StatusCode::UNAUTHORIZED),
        "the old token is gone"
    );
    // A broken key file: the reload of that part fails and the certificate in force stays.
    std::fs::write(&server.key, "not a key").unwrap();
    signal(pid, libc::SIGHUP);
    let failed = w.wait_for("reload_failed", |v| {
        v["event"] == "reload_failed" && v["part"] == "tls"
    });
    assert!(
        failed["error"].as_str().unwrap().contains("watchdog.key"),
        "{failed}"
    );
    let fresh = client(&pki.other, None);
    assert_eq!(
        jobs_status(&fresh, &url, new_token).await,
        Some(StatusCode::OK)
    );
    assert_eq!(w.pid(), pid, "no restart");
    w.stop();
}

#[test]
fn an_https_oma_without_a_ca_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vma-watchdog"))
        .args(["--state-dir", s(dir.path()), "--detector", "procfs"])
        .args([
            "--oma-url",
            "https://oma.example:8082",
            "--oma-token",
            OMA_TOKEN,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--oma-ca"), "{stderr}");
}

/// The fake OMA's HTTPS, requiring client certificates of the site CA.
fn oma_tls(pki: &Pki) -> ServerTls {
    let pair = pki.ca.server("oma").unwrap();
    ServerTls::load(ServerTlsFiles {
        cert: pair.cert,
        key: pair.key,
        client_ca: Some(pki.ca.cert.clone()),
    })
    .unwrap()
}

/// A watchdog with mutual TLS both ways: its API requires the OMA's certificate, and it
/// presents its own to the OMA at `oma_url`.
fn mutual_tls_args(pki: &Pki, oma_url: &str) -> Vec<String> {
    let server = pki.ca.server("watchdog").unwrap();
    let me = pki.ca.client("vma").unwrap();
    let pairs = [
        ("--listen", "127.0.0.1:0"),
        ("--progress-listen", "127.0.0.1:0"),
        ("--tls-cert", s(&server.cert)),
        ("--tls-key", s(&server.key)),
        ("--tls-client-ca", s(&pki.ca.cert)),
        ("--api-token", API_TOKEN),
        ("--oma-url", oma_url),
        ("--oma-token", OMA_TOKEN),
        ("--vma-id", VMA_ID),
        ("--oma-ca", s(&pki.ca.cert)),
        ("--oma-client-cert", s(&me.cert)),
        ("--oma-client-key", s(&me.key)),
    ];
    pairs
        .iter()
        .flat_map(|(flag, value)| [flag.to_string(), value.to_string()])
        .collect()
}

/// Root: a real stand-in posts its progress to the plain loopback listener while the API is
/// HTTPS, is killed, and its death reaches an OMA that requires the watchdog's client
/// certificate, carrying that progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_death_reaches_an_https_oma_with_mutual_tls_and_the_progress_of_the_plain_listener() {
    if !privileged("a_death_reaches_an_https_oma_with_mutual_tls") {
        return;
    }
    let pki = pki();
    let oma = FakeOma::start_tls(OMA_TOKEN, VMA_ID, oma_tls(&pki)).await;
    let args = mutual_tls_args(&pki, &oma.url());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let w = WatchdogProcess::start_with(&pki.state(), "procfs", &args, &[]);
    let progress = addr_of(&w, "progress_listening");
    let standin_url = format!("http://{progress}");
    // As the launcher starts migratekit: the job id in the environment turns its progress
    // client on, posting to the plain listener.
    let mut cmd = std::process::Command::new(common::standin_bin());
    cmd.args([
        "migrate",
        "--vmware-password",
        &secret(),
        "--job-id",
        "job-tls",
    ])
    .args(["--standin-progress-url", &standin_url])
    .args(["--standin-progress-interval-ms", "100"])
    .env("MIGRATEKIT_PROGRESS_JOB_ID", "job-tls");
    let standin = Standin::spawn(cmd, pki.dir.path());
    w.wait_event("process_started", standin.pid);
    let started = oma
        .wait_for(Duration::from_secs(20), |e| e.job_id == "job-tls")
        .await;
    assert!(
        started.is_some(),
        "the start reached the OMA over mutual TLS"
    );
    // Let a few updates through the plain listener.
    tokio::time::sleep(Duration::from_millis(600)).await;
    standin.kill(libc::SIGKILL);
    let death = oma
        .wait_for(Duration::from_secs(20), |e| {
            e.job_id == "job-tls" && e.kind == api::ProcessEventKind::ProcessExited
        })
        .await
        .expect("the death reached the OMA over mutual TLS");
    assert_eq!(death.0.process.pid, standin.pid);
    assert!(
        death.0.last_progress.is_some(),
        "the progress of the plain listener: {death:?}"
    );
    w.stop();
    oma.stop().await;
}
