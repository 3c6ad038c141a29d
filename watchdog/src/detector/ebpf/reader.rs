//! The ring-buffer reader task: decodes [`RawEvent`]s into [`DetectorEvent`]s.

use api::{ExitStatus, ProcessIdentity};
use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use watchdog_common::{EventKind, FLAG_OOM_VICTIM, RawEvent};

use crate::detector::DetectorEvent;

/// Decodes one ring-buffer record; `None` for a short record or an unknown kind.
pub fn decode(bytes: &[u8]) -> Option<DetectorEvent> {
    if bytes.len() < size_of::<RawEvent>() {
        return None;
    }
    // SAFETY: the length is checked; RawEvent is plain old data, read unaligned.
    let raw: RawEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let process = ProcessIdentity {
        pid: raw.tgid,
        start_time: raw.start_time,
    };
    let comm = String::from_utf8_lossy(raw.comm_bytes()).into_owned();
    match EventKind::from_u32(raw.kind)? {
        EventKind::Started => Some(DetectorEvent::Started { process, comm }),
        EventKind::Exited => Some(DetectorEvent::Exited {
            process,
            exit: ExitStatus::from_wait_status(raw.exit_status, raw.flags & FLAG_OOM_VICTIM != 0),
            comm,
            ktime_ns: Some(raw.ktime_ns),
        }),
    }
}

/// Drains the ring buffer whenever the kernel signals it readable, until the receiver is gone.
pub async fn read_ring(mut ring: AsyncFd<RingBuf<MapData>>, tx: mpsc::Sender<DetectorEvent>) {
    let mut batch = Vec::new();
    loop {
        let mut guard = match ring.readable_mut().await {
            Ok(guard) => guard,
            Err(e) => {
                tracing::error!(error = %e, "polling the eBPF ring buffer failed; no more eBPF events");
                return;
            }
        };
        let inner = guard.get_inner_mut();
        while let Some(item) = inner.next() {
            match decode(&item) {
                Some(event) => batch.push(event),
                None => tracing::warn!(
                    len = item.len(),
                    "undecodable eBPF event skipped; object and daemon out of sync?"
                ),
            }
        }
        guard.clear_ready();
        drop(guard);
        for event in batch.drain(..) {
            if tx.send(event).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use watchdog_common::COMM_LEN;

    fn bytes(raw: &RawEvent) -> Vec<u8> {
        // SAFETY: RawEvent is repr(C) plain data without padding.
        unsafe {
            std::slice::from_raw_parts((raw as *const RawEvent).cast::<u8>(), size_of::<RawEvent>())
        }
        .to_vec()
    }

    #[test]
    fn exited_records_decode_to_exit_status() {
        let mut comm = [0u8; COMM_LEN];
        comm[..10].copy_from_slice(b"migratekit");
        let raw = RawEvent {
            kind: EventKind::Exited as u32,
            tgid: 42,
            start_time: 7,
            ktime_ns: 99,
            exit_status: 0x89,
            flags: FLAG_OOM_VICTIM,
            comm,
        };
        let event = decode(&bytes(&raw)).expect("decodes");
        let exit = ExitStatus {
            code: None,
            signal: Some(9),
            core_dumped: true,
            oom_killed: true,
        };
        assert_eq!(
            event,
            DetectorEvent::Exited {
                process: ProcessIdentity {
                    pid: 42,
                    start_time: 7
                },
                exit,
                comm: "migratekit".into(),
                ktime_ns: Some(99)
            }
        );
        assert_eq!(decode(&bytes(&raw)[..20]), None);
        assert_eq!(decode(&bytes(&RawEvent { kind: 77, ..raw })), None);
    }
}
