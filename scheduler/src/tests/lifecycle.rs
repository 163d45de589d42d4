//! Digests, quarantine, soft state, expiry, and the ends of downloads, hosts and tasks.

use std::time::{Duration, Instant};

use std::collections::HashMap;

use super::*;
use crate::{token, SchedulerError};

#[test]
fn origin_digests_are_pinned_and_pushed_to_the_other_downloads_only() {
    let s = sched(|_| {});
    let mut a = Dl::open(&s, host("a"));
    let mut b = Dl::open(&s, host("b"));
    a.take();
    b.take();
    a.piece(1, "", &sha(7));
    assert!(a.take().is_empty());
    let msgs = b.take();
    let Some(Kind::PieceDigests(d)) = msgs.first() else { panic!("{msgs:?}") };
    assert_eq!(
        (d.piece_size, d.digests.len(), d.digests[0].number, d.digests[0].sha256.as_str()),
        (PS, 1, 1, &*sha(7))
    );
    // The same digest again changes nothing; a late registration gets every pinned digest first.
    a.piece(1, "", &sha(7));
    assert!(b.take().is_empty());
    let mut c = Dl::open(&s, host("c"));
    assert!(matches!(c.take().first(), Some(Kind::PieceDigests(d)) if d.digests.len() == 1));
    // A piece from a parent pins nothing, whatever digest it claims.
    b.piece(2, "a", &sha(9));
    assert!(c.take().iter().all(|m| !matches!(m, Kind::PieceDigests(_))));
}

#[test]
fn conflicting_origin_digests_quarantine_the_task() {
    let s = sched(|c| c.origin_limit = 2);
    let mut a = Dl::open(&s, host("a"));
    let mut b = Dl::open(&s, host("b"));
    b.failed_piece(0, "a", false);
    a.take();
    assert_eq!(last(&b.take()), "back_to_source");
    a.piece(0, "", &sha(1));
    b.piece(0, "", &sha(2));
    assert!(has_quarantined(&a.take()));
    let msgs = b.take();
    assert!(matches!(&msgs[..], [.., Kind::Quarantined(_), Kind::BackToSource(_)]), "{msgs:?}");
    assert!(stat(&s).quarantined);
    let mut c = Dl::open(&s, host("c"));
    let msgs = c.take();
    assert!(has_quarantined(&msgs) && last(&msgs) == "back_to_source" && parents(&msgs).is_none());
}

#[test]
fn conflicting_announced_lists_quarantine_the_task_and_a_full_list_is_pinned() {
    let info = |list: Vec<String>| TaskInfo {
        digest: D.into(),
        length: u64::from(N) * PS,
        piece_size: PS,
        piece_sha256: list,
    };
    let s = sched(|_| {});
    announce(&s, host("h1"), vec![info(full_list(10))]);
    let mut c = Dl::open(&s, host("c"));
    let msgs = c.take();
    assert!(matches!(msgs.first(), Some(Kind::PieceDigests(d)) if d.digests.len() == N as usize));
    // A partial list is not pinned; the same list again is fine; a different one quarantines.
    announce(&s, host("h2"), vec![info(full_list(10)[..2].to_vec())]);
    announce(&s, host("h3"), vec![info(full_list(10))]);
    assert!(!stat(&s).quarantined);
    announce(&s, host("h4"), vec![info(full_list(50))]);
    assert!(stat(&s).quarantined);
    assert!(has_quarantined(&c.take()));

    // An announced list that contradicts a digest pinned from the origin.
    let s = sched(|_| {});
    let mut a = Dl::open(&s, host("a"));
    a.piece(0, "", &sha(99));
    announce(&s, host("h"), vec![info(full_list(10))]);
    assert!(stat(&s).quarantined);
}

#[test]
fn a_restarted_scheduler_hands_out_an_announced_task_with_its_digests() {
    let info = TaskInfo { digest: D.into(), length: u64::from(N) * PS, piece_size: PS, piece_sha256: full_list(3) };
    let first = sched(|_| {});
    announce(&first, host("h"), vec![info.clone()]);
    drop(first);
    let s = sched(|_| {});
    assert!(!stat(&s).known);
    let resp = s
        .announce_host(proto::AnnounceHostRequest { host: Some(host("h")), tasks: vec![info], ..Default::default() })
        .expect("announce");
    assert_eq!(resp.upload_key, token::upload_key(b"test secret", "h").to_vec());
    assert_eq!(resp.announce_interval_secs, 30);
    let mut c = Dl::open(&s, host("c"));
    let msgs = c.take();
    let Some(Kind::PieceDigests(d)) = msgs.first() else { panic!("{msgs:?}") };
    assert_eq!(d.digests.iter().map(|d| d.sha256.clone()).collect::<Vec<_>>(), full_list(3));
    let Some(Kind::Parents(p)) = msgs.last() else { panic!("{msgs:?}") };
    assert_eq!((p.length, p.piece_size), (u64::from(N) * PS, PS));
    let parent = &p.parents[0];
    assert_eq!((parent.host_id.as_str(), parent.ip.as_str(), parent.port), ("h", "10.0.0.1", 4001));
    assert_eq!(parent.pieces, (0..N).collect::<Vec<_>>());
    let key = token::upload_key(b"test secret", "h");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    assert_eq!(token::verify(&[key], &parent.token, D, now), Ok("c".to_owned()));
    let st = stat(&s);
    assert_eq!((st.known, st.piece_count, st.peers.len()), (true, N, 2));
}

#[test]
fn silent_hosts_expire_unless_a_stream_is_open() {
    let s = sched(|_| {});
    holder(&s, host("silent"));
    let mut busy = Dl::open(&s, host("busy"));
    busy.take();
    let later = Instant::now() + Duration::from_secs(91);
    s.expire(later);
    let st = stat(&s);
    assert_eq!(st.peers.iter().map(|p| p.host_id.as_str()).collect::<Vec<_>>(), ["busy"]);
    // The expired host must announce again before downloading.
    assert!(matches!(s.download(reg("silent")).err(), Some(SchedulerError::FailedPrecondition(_))));
    // Within three intervals nothing expires.
    holder(&s, host("silent"));
    s.expire(Instant::now() + Duration::from_secs(60));
    assert_eq!(stat(&s).peers.len(), 2);
}

#[test]
fn register_is_validated() {
    let s = sched(|_| {});
    let bad = |r: Register| s.download(r).err();
    assert!(matches!(bad(reg("nobody")), Some(SchedulerError::FailedPrecondition(_))));
    announce(&s, host("a"), vec![]);
    assert!(matches!(bad(Register { host_id: String::new(), ..reg("a") }), Some(SchedulerError::InvalidArgument(_))));
    assert!(matches!(bad(Register { digest: String::new(), ..reg("a") }), Some(SchedulerError::InvalidArgument(_))));
    assert!(matches!(bad(Register { pieces: vec![N], ..reg("a") }), Some(SchedulerError::InvalidArgument(_))));
    let mut a = Dl::register(&s, Register { length: 0, piece_size: 0, ..reg("a") });
    assert!(matches!(a.take().last(), Some(Kind::BackToSource(_))));
    // Unknown shape first, then pinned by the next non-zero values; another piece size is
    // refused (another length makes a task of its own: `regressions.rs`).
    let mut b = Dl::open(&s, host("b"));
    assert_eq!(stat(&s).piece_count, N);
    assert!(matches!(bad(Register { piece_size: 5, ..reg("b") }), Some(SchedulerError::InvalidArgument(_))));
    let twice = b.h.send(DownloadRequest { kind: Some(Req::Register(reg("b"))) });
    assert!(matches!(twice, Err(SchedulerError::InvalidArgument(_))));
    let out_of_range = proto::PieceFinished { number: N, ..Default::default() };
    let e = b.h.send(DownloadRequest { kind: Some(Req::PieceFinished(out_of_range)) });
    assert!(matches!(e, Err(SchedulerError::InvalidArgument(_))));
    let bad_sha = proto::PieceFinished { number: 0, sha256: "XYZ".into(), ..Default::default() };
    let e = b.h.send(DownloadRequest { kind: Some(Req::PieceFinished(bad_sha)) });
    assert!(matches!(e, Err(SchedulerError::InvalidArgument(_))));
}

#[test]
fn pieces_held_at_registration_are_offered_at_once() {
    let s = sched(|_| {});
    announce(&s, host("a"), vec![]);
    let mut a = Dl::register(&s, Register { pieces: vec![1, 2], ..reg("a") });
    assert_eq!(last(&a.take()), "back_to_source");
    let mut b = Dl::open(&s, host("b"));
    // a's first child sees what it holds.
    assert_eq!(parents(&b.take()), Some(vec![("a".to_owned(), vec![1, 2])]));
    assert_eq!(stat(&s).peers.iter().find(|p| p.host_id == "a").map(|p| p.pieces), Some(2));
    // While a fetches from the origin and has a child, later children are offered its new
    // pieces one by one instead; once its stream ends it lists them again.
    let mut c = Dl::open(&s, host("c"));
    let view: HashMap<_, _> = parents(&c.take()).expect("parents").into_iter().collect();
    assert_eq!(view.get("a"), Some(&vec![]));
    drop(a);
    let mut d = Dl::open(&s, host("d"));
    let view: HashMap<_, _> = parents(&d.take()).expect("parents").into_iter().collect();
    assert_eq!(view.get("a"), Some(&vec![1, 2]));
}

#[test]
fn a_closed_stream_keeps_its_pieces_and_frees_its_origin_slot() {
    let s = sched(|c| c.idc_only = true);
    let mut a = Dl::open(&s, at("a", "1", ""));
    let mut b = Dl::open(&s, at("b", "2", ""));
    a.take();
    assert_eq!(last(&b.take()), "wait");
    a.piece(0, "", &sha(0));
    drop(a);
    assert_eq!(last(&b.take()), "back_to_source");
    let st = stat(&s);
    let pa = st.peers.iter().find(|p| p.host_id == "a").expect("a stays a holder");
    assert_eq!((pa.pieces, pa.finished), (1, false));
    let mut c = Dl::open(&s, at("c", "1", ""));
    assert_eq!(parents(&c.take()), Some(vec![("a".to_owned(), vec![0])]));
}

#[test]
fn finished_peers_hold_everything_and_finishing_frees_the_slot() {
    let s = sched(|c| c.idc_only = true);
    let mut a = Dl::open(&s, at("a", "1", ""));
    let mut b = Dl::open(&s, at("b", "2", ""));
    a.take();
    b.take();
    a.send(Req::Finished(proto::Finished {}));
    assert_eq!(last(&b.take()), "back_to_source");
    // A late request of a finished download changes nothing.
    a.send(Req::Reschedule(proto::Reschedule { stalled: vec![] }));
    assert!(a.take().is_empty());
    let st = stat(&s);
    assert!(st.peers.iter().any(|p| p.host_id == "a" && p.finished && p.pieces == N));
}

#[test]
fn leaving_withdrawing_and_deleting_reschedule_or_end_downloads() {
    let s = sched(|_| {});
    holder(&s, host("p"));
    holder(&s, host("q"));
    let mut c = Dl::open(&s, host("c"));
    assert_eq!(parent_ids(&c.take()).len(), 2);
    s.leave_host(&proto::LeaveHostRequest { host_id: "p".into() }).expect("leave");
    assert_eq!(parent_ids(&c.take()), ["q"]);
    s.withdraw_task(&proto::WithdrawTaskRequest { host_id: "q".into(), digest: D.into() }).expect("withdraw");
    assert_eq!(last(&c.take()), "back_to_source");
    assert!(matches!(s.download(reg("p")).err(), Some(SchedulerError::FailedPrecondition(_))));
    s.delete_task(&proto::DeleteTaskRequest { digest: D.into() }).expect("delete");
    assert!(!stat(&s).known);
    // The download's stream ended with the task.
    assert!(c.rx.try_recv().is_err() && c.rx.is_closed());
    let e = c.h.send(DownloadRequest { kind: Some(Req::Finished(proto::Finished {})) });
    assert!(matches!(e, Err(SchedulerError::DownloadEnded(_))));
    let text = s.metrics().encode().expect("metrics");
    assert!(text.contains("damselfly_scheduler_tasks 0") && text.contains("damselfly_scheduler_peers 0"), "{text}");
    assert!(text.contains("damselfly_scheduler_hosts 2"), "{text}");
}

#[test]
fn other_calls_validate_their_input() {
    let s = sched(|_| {});
    assert!(s.announce_host(proto::AnnounceHostRequest { host: None, tasks: vec![], ..Default::default() }).is_err());
    assert!(s
        .announce_host(proto::AnnounceHostRequest { host: Some(host("")), tasks: vec![], ..Default::default() })
        .is_err());
    let bad_sha = TaskInfo { digest: D.into(), piece_sha256: vec!["nope".into()], ..Default::default() };
    assert!(s
        .announce_host(proto::AnnounceHostRequest { host: Some(host("a")), tasks: vec![bad_sha], ..Default::default() })
        .is_err());
    let many = vec![TaskInfo { digest: D.into(), ..Default::default() }; 10_001];
    assert!(s
        .announce_host(proto::AnnounceHostRequest { host: Some(host("a")), tasks: many, ..Default::default() })
        .is_err());
    assert!(s.stat_task(&proto::StatTaskRequest { digest: String::new() }).is_err());
    assert!(s.withdraw_task(&proto::WithdrawTaskRequest { host_id: "a".into(), digest: String::new() }).is_err());
    assert!(s.leave_host(&proto::LeaveHostRequest { host_id: String::new() }).is_err());
    assert!(s.delete_task(&proto::DeleteTaskRequest { digest: String::new() }).is_err());
    // Nothing half-done was left behind by the refused announcements.
    assert!(!stat(&s).known);
}
