//! Two network namespaces joined by a veth pair, for the partition scenario: the OMA lives in
//! one, the VMA (watchdog and its migratekit processes) in the other, and the harness cuts and
//! restores the link. Everything is removed again when the pair is dropped.
//!
//! Addresses are the harness's own: `10.213.<n>.1/30` (OMA side) and `10.213.<n>.2/30` (VMA
//! side), with `<n>` derived from this process's pid so that parallel runs do not collide.

use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::process::Command;

use crate::{HarnessError, Result};

/// Runs `ip <args>`; an error carries its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| HarnessError::Spawn {
            what: "ip (from iproute2; install it with apt-get install iproute2)".into(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(HarnessError::Command {
            command: format!("ip {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Two namespaces and the veth pair between them.
#[derive(Debug)]
pub struct NetPair {
    /// The OMA's namespace.
    pub oma_ns: String,
    /// The VMA's namespace.
    pub vma_ns: String,
    /// The OMA side's address.
    pub oma_ip: IpAddr,
    /// The VMA side's address.
    pub vma_ip: IpAddr,
    oma_if: String,
    vma_if: String,
}

impl NetPair {
    /// Creates the namespaces and the link, both ends up, loopback up in each.
    pub fn create() -> Result<Self> {
        let n = std::process::id() % 250 + 1;
        let tag = format!("{}{}", std::process::id(), rand::random::<u16>());
        let pair = Self {
            oma_ns: format!("kt-oma-{tag}"),
            vma_ns: format!("kt-vma-{tag}"),
            oma_ip: IpAddr::from([10, 213, n as u8, 1]),
            vma_ip: IpAddr::from([10, 213, n as u8, 2]),
            oma_if: format!("kto{}", n),
            vma_if: format!("ktv{}", n),
        };
        // From here on, Drop removes whatever was made.
        pair.build()?;
        Ok(pair)
    }

    fn build(&self) -> Result<()> {
        ip(&["netns", "add", &self.oma_ns])?;
        ip(&["netns", "add", &self.vma_ns])?;
        ip(&[
            "link",
            "add",
            &self.oma_if,
            "netns",
            &self.oma_ns,
            "type",
            "veth",
            "peer",
            "name",
            &self.vma_if,
            "netns",
            &self.vma_ns,
        ])?;
        for (ns, ifname, addr) in [
            (&self.oma_ns, &self.oma_if, self.oma_ip),
            (&self.vma_ns, &self.vma_if, self.vma_ip),
        ] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/30"),
                "dev",
                ifname,
            ])?;
            ip(&["-n", ns, "link", "set", ifname, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// Cuts the link: both ends down, so packets in either direction are lost (connections
    /// time out rather than being refused, as in a real partition).
    pub fn cut(&self) -> Result<()> {
        ip(&["-n", &self.oma_ns, "link", "set", &self.oma_if, "down"])?;
        ip(&["-n", &self.vma_ns, "link", "set", &self.vma_if, "down"])
    }

    /// Restores the link.
    pub fn restore(&self) -> Result<()> {
        ip(&["-n", &self.oma_ns, "link", "set", &self.oma_if, "up"])?;
        ip(&["-n", &self.vma_ns, "link", "set", &self.vma_if, "up"])
    }

    /// A blocking HTTP client whose connections are made inside namespace `ns`.
    ///
    /// A thread's network namespace is its own and is inherited by the threads it creates;
    /// reqwest's blocking client makes its connections on a runtime thread it spawns when it
    /// is built. So a short-lived thread enters `ns` and builds the client there: its runtime
    /// thread, and every socket it opens, live in `ns` while the rest of the harness does not.
    pub fn client_in(ns: &str) -> Result<reqwest::blocking::Client> {
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || -> Result<reqwest::blocking::Client> {
            let file = std::fs::File::open(&path)
                .map_err(|e| HarnessError::io(format!("opening {path}"), e))?;
            // SAFETY: setns on a valid namespace fd affects only the calling thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(HarnessError::Sys {
                    what: format!("setns({path})"),
                    source: std::io::Error::last_os_error(),
                });
            }
            Ok(crate::http::client())
        })
        .join()
        .unwrap_or_else(|_| {
            Err(HarnessError::Sys {
                what: "the thread building a namespaced client panicked".into(),
                source: std::io::Error::other("panic"),
            })
        })
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of the veth pair, and with it the other end.
        let _ = ip(&["netns", "del", &self.oma_ns]);
        let _ = ip(&["netns", "del", &self.vma_ns]);
    }
}
