//! Regression tests named after the bugs they caught: state kept after everyone left, and
//! reports that reached further than the reporter's own download.

use super::*;
use crate::SchedulerError;

fn leave(s: &Scheduler, id: &str) {
    s.leave_host(&proto::LeaveHostRequest { host_id: id.into() }).expect("leave");
}

#[test]
fn a_task_is_forgotten_when_its_last_peer_leaves() {
    let s = sched(|_| {});
    let mut a = Dl::open(&s, host("a"));
    a.piece(0, "", &sha(1));
    drop(a);
    leave(&s, "a");
    assert!(!stat(&s).known);
    let text = s.metrics().encode().expect("metrics");
    assert!(text.contains("damselfly_scheduler_tasks 0"), "{text}");
}

#[test]
fn a_wrong_length_registered_first_keeps_nobody_from_sharing_the_content() {
    let s = sched(|_| {});
    announce(&s, host("x"), vec![]);
    let mut bad = Dl::register(&s, Register { length: u64::from(N) * PS + 1, ..reg("x") });
    bad.piece(0, "", &sha(9));
    // Registrations of the other length form a task of their own: the first goes to the
    // origin, the next takes pieces from it.
    announce(&s, host("c"), vec![]);
    let mut c = Dl::register(&s, reg("c"));
    assert_eq!(last(&c.take()), "back_to_source");
    c.piece(0, "", &sha(1));
    announce(&s, host("d"), vec![]);
    let mut d = Dl::register(&s, reg("d"));
    assert_eq!(parent_ids(&d.take()), ["c"]);
    // When the wrong length's task is gone, that length's registrations still join the
    // others of their length.
    drop(bad);
    leave(&s, "x");
    announce(&s, host("e"), vec![]);
    let mut e = Dl::register(&s, reg("e"));
    assert!(parent_ids(&e.take()).contains(&"c".to_owned()));
}

#[test]
fn a_blob_is_held_under_its_own_length_though_a_member_registered_another_first() {
    let s = sched(|_| {});
    announce(&s, host("x"), vec![]);
    let _bad = Dl::register(&s, Register { length: u64::from(N) * PS + 1, ..reg("x") });
    announce(&s, host("c"), vec![]);
    let mut c = Dl::register(&s, reg("c"));
    c.take();
    for i in 0..N {
        c.piece(i, "", &sha(1));
    }
    // The preheat runner asks by digest and length: the task apart, not the first one.
    let real = s.holding(D, u64::from(N) * PS);
    assert_eq!(real.peers.iter().map(|(h, n, _)| (h.as_str(), *n)).collect::<Vec<_>>(), [("c", N)]);
    let wrong = s.holding(D, u64::from(N) * PS + 1);
    assert_eq!(wrong.peers.iter().map(|(h, _, _)| h.as_str()).collect::<Vec<_>>(), ["x"]);
    assert_eq!(s.holding(&sha(7), 1), crate::Holding::default());
}

#[test]
fn another_length_than_a_verified_one_is_refused() {
    let s = sched(|_| {});
    let mut a = Dl::open(&s, host("a"));
    for n in 0..N {
        a.piece(n, "", &sha(n as u8 + 1));
    }
    a.send(Req::Finished(proto::Finished {}));
    announce(&s, host("z"), vec![]);
    let other = s.download(Register { length: u64::from(N) * PS + 1, ..reg("z") });
    assert!(matches!(other.err(), Some(SchedulerError::InvalidArgument(_))));
}

#[test]
fn a_made_up_digest_or_a_piece_of_an_unknown_count_is_refused() {
    let s = sched(|_| {});
    announce(&s, host("x"), vec![]);
    for digest in ["not-a-digest", "sha256:abc", &format!("sha256:{}", "A".repeat(64))] {
        let r = s.download(Register { digest: digest.into(), ..reg("x") });
        assert!(matches!(r.err(), Some(SchedulerError::InvalidArgument(_))), "{digest}");
    }
    let info = TaskInfo { digest: "garbage".into(), ..Default::default() };
    assert!(s
        .announce_host(proto::AnnounceHostRequest { host: Some(host("x")), tasks: vec![info], ..Default::default() })
        .is_err());
    // No length: a piece number has nothing to be checked against and would size the list.
    let mut dl = Dl::register(&s, Register { length: 0, piece_size: 0, ..reg("x") });
    let far = proto::PieceFinished { number: 99_999, sha256: sha(7), ..Default::default() };
    let e = dl.h.send(DownloadRequest { kind: Some(Req::PieceFinished(far)) });
    assert!(matches!(e, Err(SchedulerError::FailedPrecondition(_))), "{e:?}");
    assert!(s.lock().tasks.values().all(|t| t.digests.is_empty()));
    let sha512 = format!("sha512:{}", "0".repeat(128));
    assert!(s.download(Register { digest: sha512, ..reg("x") }).is_ok());
}

#[test]
fn corrupt_reports_count_only_against_the_reporters_own_parents() {
    let s = sched(|_| {});
    holder(&s, host("p"));
    let other = "sha256:00000000000000000000000000000000000000000000000000000000000000bb";
    let mut strangers = Vec::new();
    for x in ["x1", "x2"] {
        announce(&s, host(x), vec![]);
        let mut dl = Dl::register(&s, Register { digest: other.into(), ..reg(x) });
        dl.failed_piece(0, "p", true);
        strangers.push(dl);
    }
    let mut c = Dl::open(&s, host("c"));
    assert_eq!(parent_ids(&c.take()), ["p"]);
}

#[test]
fn a_new_download_starts_with_no_blocked_parents() {
    let s = sched(|_| {});
    holder(&s, host("p"));
    let mut c = Dl::open(&s, host("c"));
    assert_eq!(parent_ids(&c.take()), ["p"]);
    c.send(Req::Reschedule(proto::Reschedule { stalled: vec!["p".into()] }));
    assert_eq!(last(&c.take()), "back_to_source");
    c.piece(0, "", &sha(0));
    drop(c);
    let mut again = Dl::register(&s, reg("c"));
    let msgs = again.take();
    assert_eq!(parent_ids(&msgs), ["p"], "the new download was told {}", last(&msgs));
}

fn from(registry: &str, host: &str) -> Register {
    let source = proto::Source { registry: registry.into(), repository: "lib/x".into(), ..Default::default() };
    Register { source: Some(source), ..reg(host) }
}

#[test]
fn until_a_blob_is_verified_a_download_takes_pieces_only_from_its_own_registry() {
    let s = sched(|c| c.origin_limit = 2);
    announce(&s, host("e"), vec![]);
    let mut e = Dl::register(&s, from("https://evil.example", "e"));
    assert_eq!(last(&e.take()), "back_to_source");
    e.piece(0, "", &sha(1));
    // Another registry's client: the peer fetching from evil.example is not its parent ...
    announce(&s, host("c"), vec![]);
    let mut c = Dl::register(&s, from("https://registry.example", "c"));
    let msgs = c.take();
    assert!(parent_ids(&msgs).is_empty(), "{msgs:?}");
    // ... nor of a client naming that registry over plain HTTP, whose bytes anyone on the
    // path chose ...
    announce(&s, host("h"), vec![]);
    let mut h = Dl::register(&s, from("http://evil.example", "h"));
    let msgs = h.take();
    assert!(parent_ids(&msgs).is_empty(), "{msgs:?}");
    // ... while a client of the same registry pipelines from it as usual.
    announce(&s, host("d"), vec![]);
    let mut d = Dl::register(&s, from("https://evil.example", "d"));
    assert_eq!(parent_ids(&d.take()), ["e"]);
    // Once a node verified the whole blob, its pieces and digests are the blob's.
    for n in 1..N {
        e.piece(n, "", &sha(n as u8 + 1));
    }
    e.send(Req::Finished(proto::Finished {}));
    c.send(Req::Reschedule(proto::Reschedule { stalled: vec![] }));
    assert!(parent_ids(&c.take()).contains(&"e".to_owned()));
}

#[test]
fn a_holder_that_tells_a_child_it_has_nothing_is_forgotten_for_the_task() {
    let s = sched(|_| {});
    holder(&s, host("p"));
    holder(&s, host("q"));
    let mut c = Dl::open(&s, host("c"));
    assert_eq!(parent_ids(&c.take()).len(), 2);
    // A stranger's word counts for nothing ...
    announce(&s, host("x"), vec![]);
    let other = "sha256:00000000000000000000000000000000000000000000000000000000000000bb";
    let mut x = Dl::register(&s, Register { digest: other.into(), ..reg("x") });
    let gone =
        |parent: &str| proto::PieceFailed { number: 0, parent_id: parent.into(), gone: true, ..Default::default() };
    x.send(Req::PieceFailed(gone("p")));
    assert!(stat(&s).peers.iter().any(|p| p.host_id == "p"));
    // ... a child's that was sent to it forgets it.
    c.send(Req::PieceFailed(gone("p")));
    assert!(stat(&s).peers.iter().all(|p| p.host_id != "p"));
    let mut d = Dl::open(&s, host("d"));
    let parents = parent_ids(&d.take());
    assert!(parents.contains(&"q".to_owned()) && !parents.contains(&"p".to_owned()), "{parents:?}");
    // It comes back when it announces the blob again.
    holder(&s, host("p"));
    assert!(stat(&s).peers.iter().any(|p| p.host_id == "p"));
}
