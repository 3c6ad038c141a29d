use std::net::{TcpListener, TcpStream};

use super::*;
use crate::launcher::proc_identity;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

// The rows below are as a little-endian host prints them (every host this runs on).
#[cfg(target_endian = "little")]
#[test]
fn an_ipv4_row_is_parsed() {
    let line = "   3: 0100007F:D431 0100007F:1F91 01 00000000:00000000 00:00000000 00000000  1000        0 4242424 1 0000000000000000 20 4 30 10 -1";
    let row = parse_row(line).unwrap();
    assert_eq!(row.local, addr("127.0.0.1:54321"));
    assert_eq!(row.remote, addr("127.0.0.1:8081"));
    assert_eq!((row.uid, row.inode), (1000, 4_242_424));
    let listener = "   0: 0A00A8C0:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 17 1 0000000000000000 100 0 0 10 0";
    let row = parse_row(listener).unwrap();
    assert_eq!(row.local, addr("192.168.0.10:22"));
    assert_eq!(row.remote, addr("0.0.0.0:0"));
    assert_eq!((row.uid, row.inode), (0, 17));
}

#[cfg(target_endian = "little")]
#[test]
fn ipv6_rows_are_parsed_word_by_word() {
    let loopback = "   1: 00000000000000000000000001000000:1F91 00000000000000000000000001000000:A000 01 00000000:00000000 00:00000000 00000000    65534        0 99 1 0000000000000000 20 4 0 10 -1";
    let row = parse_row(loopback).unwrap();
    assert_eq!(row.local, addr("[::1]:8081"));
    assert_eq!(row.remote, addr("[::1]:40960"));
    assert_eq!((row.uid, row.inode), (65534, 99));
    let global = "   2: B80D0120000000000000000001000000:0050 B80D012000000000000000000200AD0B:C350 01 00000000:00000000 00:00000000 00000000     0        0 7 1 0000000000000000 20 4 0 10 -1";
    let row = parse_row(global).unwrap();
    assert_eq!(row.local, addr("[2001:db8::1]:80"));
    assert_eq!(row.remote, addr("[2001:db8::bad:2]:50000"));
}

#[cfg(target_endian = "little")]
#[test]
fn an_ipv4_mapped_row_is_parsed_as_ipv6() {
    let line = "   0: 0000000000000000FFFF00000100007F:9C40 0000000000000000FFFF00000100007F:1F91 01 00000000:00000000 00:00000000 00000000     0        0 555 1 0000000000000000 20 4 0 10 -1";
    let row = parse_row(line).unwrap();
    assert_eq!(row.local, addr("[::ffff:127.0.0.1]:40000"));
    assert_eq!(row.remote, addr("[::ffff:127.0.0.1]:8081"));
    assert_eq!(row.inode, 555);
}

#[test]
fn headers_and_garbage_are_not_rows() {
    let header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode";
    assert_eq!(parse_row(header), None);
    assert_eq!(parse_row(""), None);
    assert_eq!(parse_row("   0: 0100007F:1F91"), None);
    assert_eq!(
        parse_row("   0: 0100007:1F91 00000000:0000 0A 0:0 0:0 0 0 0 1"),
        None
    );
    assert_eq!(
        parse_row("   0: ZZ00007F:1F91 00000000:0000 0A 0:0 0:0 0 0 0 1"),
        None
    );
}

#[test]
fn an_ipv4_peer_is_looked_for_in_both_tables() {
    let conn = Connection {
        peer: addr("[::ffff:127.0.0.1]:40000"),
        local: addr("[::ffff:127.0.0.1]:8081"),
    };
    let forms = lookup_forms(conn);
    assert_eq!(
        forms,
        vec![
            ("tcp", addr("127.0.0.1:40000"), addr("127.0.0.1:8081")),
            (
                "tcp6",
                addr("[::ffff:127.0.0.1]:40000"),
                addr("[::ffff:127.0.0.1]:8081")
            ),
        ]
    );
    let v6 = Connection {
        peer: addr("[::1]:40000"),
        local: addr("[::1]:8081"),
    };
    assert_eq!(
        lookup_forms(v6),
        vec![("tcp6", addr("[::1]:40000"), addr("[::1]:8081"))]
    );
}

/// A real connection: the client end in this process, the accepted end as the server sees it.
fn connect(listen: &str, to: impl Fn(u16) -> SocketAddr) -> ((TcpStream, TcpStream), Connection) {
    let listener = TcpListener::bind(listen).unwrap();
    let client = TcpStream::connect(to(listener.local_addr().unwrap().port())).unwrap();
    let (accepted, peer) = listener.accept().unwrap();
    let conn = Connection {
        peer,
        local: accepted.local_addr().unwrap(),
    };
    ((client, accepted), conn)
}

fn me() -> ProcessIdentity {
    proc_identity(std::process::id()).unwrap()
}

#[test]
fn a_real_loopback_connection_is_found_to_be_this_process() {
    let ((client, _server), conn) = connect("127.0.0.1:0", |p| addr(&format!("127.0.0.1:{p}")));
    assert_eq!(conn.peer, client.local_addr().unwrap());
    let row = verify(me(), conn).expect("this process holds the client socket");
    assert_eq!(row.local, client.local_addr().unwrap());
    // SAFETY: geteuid has no preconditions.
    assert_eq!(row.uid, unsafe { libc::geteuid() });
    assert_eq!(find_any_holder(row.inode), Some(std::process::id()));

    // The same connection does not come from another process, even of the same user.
    let mut other = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let err = verify(proc_identity(other.id()).unwrap(), conn).unwrap_err();
    assert!(matches!(err, PeerError::NotHeld { .. }), "{err}");
    assert_eq!(err.row().map(|r| r.inode), Some(row.inode));
    other.kill().unwrap();
    other.wait().unwrap();
}

#[test]
fn a_connection_made_by_another_thread_counts_as_this_process() {
    let (ends, conn) =
        std::thread::spawn(|| connect("127.0.0.1:0", |p| addr(&format!("127.0.0.1:{p}"))))
            .join()
            .unwrap();
    verify(me(), conn).expect("threads share the fd table");
    drop(ends);
}

#[test]
fn a_dual_stack_listener_finds_ipv4_and_ipv4_mapped_clients() {
    if TcpListener::bind("[::]:0").is_err() {
        eprintln!("SKIP: no IPv6 on this host");
        return;
    }
    // An IPv4 client socket: the server sees a mapped peer, the row is in `tcp`.
    let (_v4, conn) = connect("[::]:0", |p| addr(&format!("127.0.0.1:{p}")));
    assert!(conn.peer.is_ipv6(), "{conn:?}");
    verify(me(), conn).expect("found in tcp");
    // An IPv6 client socket to the mapped address: the row is in `tcp6`, mapped.
    let (_v6, conn) = connect("[::]:0", |p| addr(&format!("[::ffff:127.0.0.1]:{p}")));
    verify(me(), conn).expect("found in tcp6");
    if let Ok(listener) = TcpListener::bind("[::1]:0") {
        drop(listener);
        let (_c, conn) = connect("[::1]:0", |p| addr(&format!("[::1]:{p}")));
        verify(me(), conn).expect("found over ::1");
    }
}

#[test]
fn a_wrong_start_time_or_a_closed_connection_is_refused() {
    let ((client, _server), conn) = connect("127.0.0.1:0", |p| addr(&format!("127.0.0.1:{p}")));
    let mut wrong = me();
    wrong.start_time += 1;
    let err = verify(wrong, conn).unwrap_err();
    assert!(matches!(err, PeerError::Replaced { .. }), "{err}");
    drop(client);
    // Closed by the client: its socket lingers without an inode (`FIN_WAIT`, `TIME_WAIT`),
    // which no process holds.
    let err = verify(me(), conn).unwrap_err();
    assert!(matches!(err, PeerError::NoSocket { .. }), "{err}");
    let gone = ProcessIdentity {
        pid: u32::MAX - 1,
        start_time: 1,
    };
    assert!(matches!(verify(gone, conn), Err(PeerError::Gone { .. })));
}

#[test]
fn sock_diag_finds_the_same_socket_as_the_proc_table() {
    for (listen, to) in [
        ("127.0.0.1:0", "127.0.0.1"),
        ("[::]:0", "127.0.0.1"),
        ("[::]:0", "::ffff:127.0.0.1"),
        ("[::1]:0", "::1"),
    ] {
        if TcpListener::bind(listen).is_err() {
            eprintln!("SKIP: cannot listen on {listen}");
            continue;
        }
        let to: IpAddr = to.parse().unwrap();
        let (ends, conn) = connect(listen, |p| SocketAddr::new(to, p));
        let from_diag = diag::lookup(conn.peer, conn.local)
            .expect("sock_diag answers")
            .expect("sock_diag finds the client socket");
        let views = views_of(std::process::id());
        let from_proc = find_row(&views, conn).unwrap().expect("the table has it");
        assert_eq!(
            (from_diag.inode, from_diag.uid),
            (from_proc.inode, from_proc.uid),
            "{listen} -> {to}"
        );
        // The server's own end is another socket; asked the other way round, the kernel
        // finds the accepted one, never the client's.
        let reverse = diag::lookup(conn.local, conn.peer).unwrap().unwrap();
        assert_ne!(reverse.inode, from_diag.inode);
        drop(ends);
    }
    let nothing = diag::lookup(addr("127.0.0.1:1"), addr("127.0.0.1:2")).unwrap();
    assert_eq!(nothing, None);
}
