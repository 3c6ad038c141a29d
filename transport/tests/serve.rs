//! The transport against real sockets, real TLS handshakes and certificates made at test
//! time: limits, timeouts, server and client certificates, reload.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::get;
use test_support::pki::{TestCa, TwoCas};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use transport::{ClientTlsFiles, Ends, Limits, ServeStats, ServerTls, ServerTlsFiles, serve};

struct Server {
    addr: SocketAddr,
    stats: Arc<ServeStats>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(tls: Option<ServerTls>, limits: Limits) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route(
            "/peer",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
        );
        let stats = Arc::new(ServeStats::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, router, tls, limits, stats.clone(), async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stats,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("the server stops within its grace period")
            .unwrap();
    }
}

fn limits(header_ms: u64, max: usize) -> Limits {
    Limits {
        max_connections: max,
        header_read_timeout: Duration::from_millis(header_ms),
        handshake_timeout: Duration::from_millis(500),
        shutdown_grace: Duration::from_secs(2),
    }
}

fn client(files: &ClientTlsFiles) -> reqwest::Client {
    files
        .apply(reqwest::Client::builder().timeout(Duration::from_secs(5)))
        .unwrap()
        .build()
        .unwrap()
}

/// Reads until the server closes the connection; returns how long that took.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the connection was still open after {limit:?}"),
        }
    }
}

#[tokio::test]
async fn the_handler_sees_the_peer_address() {
    let server = Server::start(None, limits(5_000, 8)).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let local = stream.local_addr().unwrap();
    stream
        .write_all(b"GET /peer HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.ends_with(&local.to_string()), "{answer}");
    server.stop().await;
}

#[tokio::test]
async fn the_handler_sees_both_ends_of_the_connection_also_on_a_wildcard_listener() {
    // Bound to the wildcard: the server's own end is the address the client dialled, not
    // the listener's 0.0.0.0.
    let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = Router::new().route(
        "/ends",
        get(|ConnectInfo(ends): ConnectInfo<Ends>| async move {
            format!("{} {}", ends.peer, ends.local)
        }),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let stats = Arc::new(ServeStats::default());
    let task = tokio::spawn(serve(
        listener,
        router,
        None,
        limits(5_000, 8),
        stats,
        async {
            let _ = stopped.await;
        },
    ));
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (client, server) = (stream.local_addr().unwrap(), stream.peer_addr().unwrap());
    stream
        .write_all(b"GET /ends HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.ends_with(&format!("{client} {server}")), "{answer}");
    assert_eq!(server.ip().to_string(), "127.0.0.1");
    let _ = stop.send(());
    task.await.unwrap();
}

#[tokio::test]
async fn silent_slow_and_idle_connections_are_closed_after_the_header_timeout() {
    let server = Server::start(None, limits(300, 8)).await;
    // Says nothing at all.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    // Starts a request and never finishes its headers.
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /peer HTTP/1.1\r\nhost:")
        .await
        .unwrap();
    // Finishes one request and then sits idle on the kept-alive connection.
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(b"GET /peer HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(idle.read(&mut buf).await.unwrap() > 0, "the first answer");
    for stream in [&mut silent, &mut slow, &mut idle] {
        closed_within(stream, Duration::from_secs(5)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn at_the_cap_a_new_client_waits_for_a_slot_instead_of_failing() {
    let server = Server::start(None, limits(400, 2)).await;
    let _a = TcpStream::connect(server.addr).await.unwrap();
    let _b = TcpStream::connect(server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Both slots are held by clients that say nothing: the next request is answered once
    // their header timeout frees a slot.
    let answer = client(&ClientTlsFiles::default())
        .get(format!("http://{}/peer", server.addr))
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success());
    assert!(server.stats.at_capacity.load(Ordering::Relaxed) >= 1);
    server.stop().await;
}

type Pki = TwoCas;

fn pki() -> Pki {
    TwoCas::new().unwrap()
}

fn server_tls(pki: &Pki, client_ca: bool) -> ServerTls {
    let pair = pki.ca.server("server").unwrap();
    ServerTls::load(ServerTlsFiles {
        cert: pair.cert,
        key: pair.key,
        client_ca: client_ca.then(|| pki.ca.cert.clone()),
    })
    .unwrap()
}

fn trusting(ca: &TestCa) -> ClientTlsFiles {
    ClientTlsFiles {
        ca: Some(ca.cert.clone()),
        ..ClientTlsFiles::default()
    }
}

#[tokio::test]
async fn https_is_served_to_clients_of_its_ca_only_and_plain_http_is_refused() {
    let pki = pki();
    let server = Server::start(Some(server_tls(&pki, false)), limits(5_000, 8)).await;
    let url = format!("https://127.0.0.1:{}/peer", server.addr.port());
    let ok = client(&trusting(&pki.ca)).get(&url).send().await.unwrap();
    assert!(ok.status().is_success());
    let wrong_ca = client(&trusting(&pki.other)).get(&url).send().await;
    assert!(wrong_ca.is_err(), "a client of another CA must not connect");
    let no_ca = client(&ClientTlsFiles::default()).get(&url).send().await;
    assert!(no_ca.is_err(), "nothing is trusted without a CA");
    let plain = client(&ClientTlsFiles::default())
        .get(format!("http://{}/peer", server.addr))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP on the TLS port");
    assert!(server.stats.handshakes_failed.load(Ordering::Relaxed) >= 1);
    server.stop().await;
}

#[tokio::test]
async fn an_expired_server_certificate_is_refused_by_the_client() {
    let pki = pki();
    let pair = pki.ca.expired_server("expired").unwrap();
    let tls = ServerTls::load(ServerTlsFiles {
        cert: pair.cert,
        key: pair.key,
        client_ca: None,
    })
    .unwrap();
    let server = Server::start(Some(tls), limits(5_000, 8)).await;
    let url = format!("https://127.0.0.1:{}/peer", server.addr.port());
    let err = client(&trusting(&pki.ca))
        .get(&url)
        .send()
        .await
        .unwrap_err();
    let chain = format!("{:?}", err);
    assert!(chain.to_lowercase().contains("expired"), "{chain}");
    server.stop().await;
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_of_the_ca() {
    let pki = pki();
    let server = Server::start(Some(server_tls(&pki, true)), limits(5_000, 8)).await;
    let url = format!("https://127.0.0.1:{}/peer", server.addr.port());
    let without = client(&trusting(&pki.ca)).get(&url).send().await;
    assert!(without.is_err(), "no client certificate");
    let stranger = pki.other.client("stranger").unwrap();
    let with_other = ClientTlsFiles {
        cert: Some(stranger.cert),
        key: Some(stranger.key),
        ..trusting(&pki.ca)
    };
    assert!(client(&with_other).get(&url).send().await.is_err());
    let mine = pki.ca.client("vma-1").unwrap();
    let with_mine = ClientTlsFiles {
        cert: Some(mine.cert),
        key: Some(mine.key),
        ..trusting(&pki.ca)
    };
    let ok = client(&with_mine).get(&url).send().await.unwrap();
    assert!(ok.status().is_success());
    server.stop().await;
}

#[tokio::test]
async fn a_replaced_certificate_takes_effect_on_reload_without_a_restart() {
    let pki = pki();
    let tls = server_tls(&pki, false);
    let server = Server::start(Some(tls.clone()), limits(5_000, 8)).await;
    let url = format!("https://127.0.0.1:{}/peer", server.addr.port());
    let old_client = client(&trusting(&pki.ca));
    assert!(old_client.get(&url).send().await.is_ok());
    // The operator replaces the files with a certificate of another CA: nothing changes
    // until the reload, then new connections get the new certificate.
    let new = pki.other.server("server-new").unwrap();
    std::fs::copy(&new.cert, pki.ca.server_path("server")).unwrap();
    std::fs::copy(&new.key, pki.ca.key_path("server")).unwrap();
    let new_client = client(&trusting(&pki.other));
    assert!(
        new_client.get(&url).send().await.is_err(),
        "before the reload"
    );
    tls.reload().unwrap();
    assert!(
        new_client
            .get(&url)
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    // A reload from a broken file keeps the configuration in use.
    std::fs::write(pki.ca.key_path("server"), "not a key").unwrap();
    let err = tls.reload().unwrap_err();
    assert!(err.to_string().contains("server.key"), "{err}");
    let fresh = client(&trusting(&pki.other));
    assert!(fresh.get(&url).send().await.unwrap().status().is_success());
    server.stop().await;
}
