//! Who may pin the piece digests every download checks pieces against, and how wrong ones
//! are cleared: the attacks of a member that reports or announces digests of its own.

use super::*;

fn announce_list(s: &Scheduler, h: proto::Host, list: Vec<String>) {
    let info = TaskInfo { digest: D.into(), length: u64::from(N) * PS, piece_size: PS, piece_sha256: list };
    announce(s, h, vec![info]);
}

fn pinned(s: &Scheduler) -> usize {
    s.lock().tasks.get(D).map_or(0, |t| t.digests.iter().filter(|d| d.is_some()).count())
}

#[test]
fn origin_pieces_pin_only_from_a_download_the_scheduler_sent_to_the_origin() {
    let s = sched(|_| {});
    let mut a = Dl::open(&s, host("a"));
    assert_eq!(last(&a.take()), "back_to_source");
    // b was told to wait for a (the origin slot is a's) and says it fetched from the origin.
    let mut b = Dl::open(&s, host("b"));
    assert_ne!(last(&b.take()), "back_to_source");
    b.piece(0, "", &sha(66));
    assert_eq!(pinned(&s), 0, "a download never sent to the origin pinned a digest");
    a.piece(0, "", &sha(1));
    assert_eq!(pinned(&s), 1);
    assert!(!has_quarantined(&a.take()), "b's word did not conflict with a's");
}

#[test]
fn an_announced_list_pins_but_does_not_make_the_task_trusted() {
    let s = sched(|_| {});
    announce_list(&s, host("m"), full_list(9));
    assert_eq!(pinned(&s), N as usize);
    let task_trusted = s.lock().tasks.get(D).is_some_and(|t| t.trusted);
    assert!(!task_trusted, "a member's announcement alone vouches for nothing more than its word");
}

#[test]
fn content_failing_its_digest_unpins_and_blocks_the_host_whose_word_pinned_it() {
    let s = sched(|_| {});
    announce_list(&s, host("evil"), full_list(9));
    let mut c = Dl::open(&s, host("c"));
    assert_eq!(parent_ids(&c.take()), ["evil"]);
    for n in 0..N {
        c.piece(n, "evil", "");
    }
    c.failed_piece(0, "evil", true);
    c.send(Req::Failed(proto::Failed { reason: "content failed its digest".into(), poisoned: true }));
    assert_eq!(pinned(&s), 0, "the wrong digests are gone");
    assert!(s.lock().hosts.get("evil").is_some_and(|h| h.blocked(std::time::Instant::now())));
    // The next download goes to the origin, and its pieces pin the right digests.
    let mut d = Dl::open(&s, host("d"));
    assert_eq!(last(&d.take()), "back_to_source");
    d.piece(0, "", &sha(1));
    assert_eq!(pinned(&s), 1);
    let text = s.metrics().encode().expect("metrics");
    assert!(text.contains("damselfly_scheduler_poison_reports_total 1"), "{text}");
}

#[test]
fn a_poison_report_against_digests_a_download_verified_changes_nothing() {
    let s = sched(|_| {});
    let mut a = Dl::open(&s, host("a"));
    for n in 0..N {
        a.piece(n, "", &sha(n as u8 + 1));
    }
    a.send(Req::Finished(proto::Finished {}));
    let mut liar = Dl::open(&s, host("liar"));
    liar.send(Req::Failed(proto::Failed { reason: "lies".into(), poisoned: true }));
    assert_eq!(pinned(&s), N as usize);
    assert!(!s.lock().hosts.get("a").is_some_and(|h| h.blocked(std::time::Instant::now())));
}

#[test]
fn announcing_thousands_of_large_tasks_costs_no_piece_bitmaps() {
    let s = sched(|_| {});
    // 100,000 pieces of 1 byte each, times thousands: once a full bitmap per peer (12.5 KiB).
    let tasks: Vec<TaskInfo> = (0..5_000u32)
        .map(|i| TaskInfo { digest: format!("sha256:{i:064x}"), length: 100_000, piece_size: 1, piece_sha256: vec![] })
        .collect();
    announce(&s, host("big"), tasks);
    let st = s.lock();
    assert_eq!(st.tasks.len(), 5_000);
    let words: usize = st.tasks.values().flat_map(|t| t.peers.iter()).map(|p| p.pieces.words()).sum();
    assert_eq!(words, 0);
}

#[test]
fn a_host_holds_a_bounded_number_of_tasks() {
    let s = sched(|_| {});
    let batch = |from: usize| -> Vec<TaskInfo> {
        (from..from + 10_000)
            .map(|i| TaskInfo { digest: format!("sha256:{i:064x}"), length: 10, piece_size: 4, piece_sha256: vec![] })
            .collect()
    };
    for from in [0, 10_000, 20_000] {
        announce(&s, host("greedy"), batch(from));
    }
    let held = s.lock().hosts.get("greedy").map_or(0, |h| h.tasks.len());
    assert_eq!(held, crate::scheduler::MAX_HOST_TASKS);
}
