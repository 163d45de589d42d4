//! Rule tests: the scheduler driven in-process, as a node would over gRPC.

mod cache;
mod lifecycle;
mod members;
mod pins;
mod pipelining;
mod regressions;
mod rules;
mod sessions;

use tokio::sync::mpsc;

use crate::proto::download_request::Kind as Req;
use crate::proto::download_response::Kind;
use crate::proto::{self, DownloadRequest, DownloadResponse, Register, TaskInfo};
use crate::{DownloadHandle, Scheduler, SchedulerConfig};

pub(crate) const D: &str = "sha256:00000000000000000000000000000000000000000000000000000000000000aa";
pub(crate) const PS: u64 = 1 << 20;
/// Pieces of the task the tests download.
pub(crate) const N: u32 = 4;

pub(crate) fn sched(tune: impl FnOnce(&mut SchedulerConfig)) -> Scheduler {
    let mut cfg = SchedulerConfig { secret: b"test secret".to_vec(), ..Default::default() };
    tune(&mut cfg);
    Scheduler::new(cfg)
}

pub(crate) fn host(id: &str) -> proto::Host {
    proto::Host { id: id.into(), ip: "10.0.0.1".into(), upload_port: 4001, upload_slots: 4, ..Default::default() }
}

pub(crate) fn at(id: &str, idc: &str, location: &str) -> proto::Host {
    proto::Host { idc: idc.into(), location: location.into(), ..host(id) }
}

pub(crate) fn announce(s: &Scheduler, h: proto::Host, tasks: Vec<TaskInfo>) {
    s.announce_host(proto::AnnounceHostRequest { host: Some(h), tasks, ..Default::default() }).expect("announce");
}

/// A host that holds the test task completely.
pub(crate) fn holder(s: &Scheduler, h: proto::Host) {
    announce(
        s,
        h,
        vec![TaskInfo { digest: D.into(), length: u64::from(N) * PS, piece_size: PS, piece_sha256: vec![] }],
    );
}

pub(crate) fn sha(b: u8) -> String {
    format!("{b:02x}").repeat(32)
}

pub(crate) fn full_list(seed: u8) -> Vec<String> {
    (0..N as u8).map(|i| sha(seed.wrapping_add(i))).collect()
}

pub(crate) fn reg(host: &str) -> Register {
    Register {
        host_id: host.into(),
        digest: D.into(),
        length: u64::from(N) * PS,
        piece_size: PS,
        source: Some(proto::Source {
            registry: "https://registry.example".into(),
            repository: "library/app".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A download by a host that announces itself first.
pub(crate) struct Dl {
    pub h: DownloadHandle,
    pub rx: mpsc::Receiver<DownloadResponse>,
}

impl Dl {
    pub fn open(s: &Scheduler, h: proto::Host) -> Dl {
        let id = h.id.clone();
        announce(s, h, vec![]);
        Dl::register(s, reg(&id))
    }

    pub fn register(s: &Scheduler, r: Register) -> Dl {
        let (h, rx) = s.download(r).expect("register");
        Dl { h, rx }
    }

    /// Everything queued so far.
    pub fn take(&mut self) -> Vec<Kind> {
        std::iter::from_fn(|| self.rx.try_recv().ok()).filter_map(|m| m.kind).collect()
    }

    pub fn send(&mut self, kind: Req) {
        self.h.send(DownloadRequest { kind: Some(kind) }).expect("request");
    }

    pub fn piece(&mut self, number: u32, parent: &str, sha256: &str) {
        let p = proto::PieceFinished {
            number,
            parent_id: parent.into(),
            sha256: sha256.into(),
            cost_micros: if parent.is_empty() { 0 } else { 1000 },
        };
        self.send(Req::PieceFinished(p));
    }

    pub fn failed_piece(&mut self, number: u32, parent: &str, corrupt: bool) {
        let p = proto::PieceFailed { number, parent_id: parent.into(), reason: "test".into(), corrupt, gone: false };
        self.send(Req::PieceFailed(p));
    }
}

/// The host ids of the last `Parents` among `msgs`, with the pieces each holds.
pub(crate) fn parents(msgs: &[Kind]) -> Option<Vec<(String, Vec<u32>)>> {
    msgs.iter().rev().find_map(|m| match m {
        Kind::Parents(p) => Some(p.parents.iter().map(|p| (p.host_id.clone(), p.pieces.clone())).collect()),
        _ => None,
    })
}

pub(crate) fn parent_ids(msgs: &[Kind]) -> Vec<String> {
    parents(msgs).unwrap_or_default().into_iter().map(|(id, _)| id).collect()
}

pub(crate) fn last(msgs: &[Kind]) -> &'static str {
    match msgs.last() {
        Some(Kind::Parents(_)) => "parents",
        Some(Kind::BackToSource(_)) => "back_to_source",
        Some(Kind::Wait(_)) => "wait",
        Some(Kind::PieceDigests(_)) => "piece_digests",
        Some(Kind::PieceAvailable(_)) => "piece_available",
        Some(Kind::Quarantined(_)) => "quarantined",
        None => "nothing",
    }
}

pub(crate) fn has_quarantined(msgs: &[Kind]) -> bool {
    msgs.iter().any(|m| matches!(m, Kind::Quarantined(_)))
}

pub(crate) fn stat(s: &Scheduler) -> proto::StatTaskResponse {
    s.stat_task(&proto::StatTaskRequest { digest: D.into() }).expect("stat")
}
