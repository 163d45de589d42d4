//! Who may be a parent, who goes to the origin, who waits.

use super::*;
use crate::proto::Reschedule;
use crate::DecisionKind;

#[test]
fn a_host_is_never_its_own_parent() {
    let s = sched(|_| {});
    // The host announced the task, then downloads it again (it lost it meanwhile).
    holder(&s, host("a"));
    let mut a = Dl::register(&s, reg("a"));
    assert_eq!(last(&a.take()), "back_to_source");
    holder(&s, host("b"));
    let mut a = Dl::register(&s, reg("a"));
    assert_eq!(parent_ids(&a.take()), ["b"]);
}

#[test]
fn a_failed_parent_is_blocked_and_a_stalled_one_too_then_the_origin_is_used() {
    let s = sched(|_| {});
    let mut o = Dl::open(&s, host("o"));
    assert_eq!(last(&o.take()), "back_to_source");
    holder(&s, host("h"));
    let mut c = Dl::open(&s, host("c"));
    let mut first = parent_ids(&c.take());
    first.sort();
    assert_eq!(first, ["h", "o"]);
    c.failed_piece(0, "o", false);
    assert_eq!(parent_ids(&c.take()), ["h"]);
    c.send(Req::Reschedule(Reschedule { stalled: vec!["h".into()] }));
    // Every candidate blocked: the origin, although its one slot is taken by o.
    assert_eq!(last(&c.take()), "back_to_source");
    assert_eq!(s.metrics().decisions(DecisionKind::BackToSource), 2);
    // Other children are not affected by c's blocklist.
    let mut d = Dl::open(&s, host("d"));
    assert_eq!(parent_ids(&d.take()).len(), 3);
}

#[test]
fn a_host_reported_corrupt_by_two_children_is_blocked_for_everyone() {
    let s = sched(|_| {});
    holder(&s, host("bad"));
    holder(&s, host("good"));
    let mut x = Dl::open(&s, host("x"));
    let mut y = Dl::open(&s, host("y"));
    x.take();
    y.take();
    x.failed_piece(0, "bad", true);
    // One report is not enough: a new child still gets the host.
    let mut z = Dl::open(&s, host("z"));
    assert!(parent_ids(&z.take()).contains(&"bad".to_owned()));
    // A repeated report by the same child does not count twice.
    x.failed_piece(1, "bad", true);
    let mut w = Dl::open(&s, host("w"));
    assert!(parent_ids(&w.take()).contains(&"bad".to_owned()));
    y.failed_piece(0, "bad", true);
    let mut v = Dl::open(&s, host("v"));
    assert!(!parent_ids(&v.take()).contains(&"bad".to_owned()));
    assert!(!parent_ids(&y.take()).contains(&"bad".to_owned()));
}

#[test]
fn the_same_idc_comes_first_then_the_closest_location() {
    for _ in 0..20 {
        let s = sched(|_| {});
        holder(&s, at("far", "idc2", "eu|z1|r1"));
        holder(&s, at("near", "idc1", "us|z9|r9"));
        let mut c = Dl::open(&s, at("c", "idc1", "eu|z1|r1"));
        assert_eq!(parent_ids(&c.take()), ["near", "far"]);

        let s = sched(|_| {});
        holder(&s, at("zone", "idc1", "eu|z2|r1"));
        holder(&s, at("rack", "idc1", "eu|z1|r2"));
        holder(&s, at("region", "idc1", "us|z1|r1"));
        let mut c = Dl::open(&s, at("c", "idc1", "eu|z1|r1"));
        assert_eq!(parent_ids(&c.take()), ["rack", "zone", "region"]);
    }
}

#[test]
fn idc_only_never_hands_out_a_parent_from_another_idc() {
    let s = sched(|c| c.idc_only = true);
    holder(&s, at("far", "idc2", ""));
    let mut c = Dl::open(&s, at("c", "idc1", ""));
    assert_eq!(last(&c.take()), "back_to_source");
    // A child without an idc may use anyone.
    let mut d = Dl::open(&s, host("d"));
    assert_eq!(parent_ids(&d.take()).len(), 2);
    let mut e = Dl::open(&s, at("e", "idc1", ""));
    assert_eq!(parent_ids(&e.take()), ["c"]);
}

/// A host that takes pieces over TLS cannot fetch from one that serves them plain, nor the
/// other way round: while a cluster moves to TLS, each side gets parents from its own side.
#[test]
fn hosts_are_paired_only_with_hosts_that_agree_on_peer_tls() {
    let s = sched(|_| {});
    let tls = |id: &str| proto::Host { peer_tls: true, ..host(id) };
    holder(&s, host("plain-holder"));
    holder(&s, tls("tls-holder"));
    let mut plain = Dl::open(&s, host("plain"));
    assert_eq!(parent_ids(&plain.take()), ["plain-holder"]);
    let mut secure = Dl::open(&s, tls("secure"));
    assert_eq!(parent_ids(&secure.take()), ["tls-holder"]);
}

/// A seed the child cannot take pieces from is not asked to fetch for it.
#[test]
fn a_seed_is_asked_only_for_children_that_agree_on_peer_tls() {
    let s = sched(|_| {});
    announce(&s, proto::Host { seed: true, ..host("seed") }, vec![]);
    let mut sub = s.seed_tasks(&proto::SeedTasksRequest { host_id: "seed".into() }).expect("seed stream");
    let mut secure = Dl::open(&s, proto::Host { peer_tls: true, ..host("secure") });
    assert_eq!(last(&secure.take()), "back_to_source");
    assert!(sub.rx_try().is_none(), "the plain seed was asked for a TLS child");
}

#[test]
fn a_busy_parent_ranks_below_an_idle_one() {
    let s = sched(|c| c.max_parents = 1);
    holder(&s, host("p"));
    holder(&s, host("q"));
    let mut a = Dl::open(&s, host("a"));
    let first = parent_ids(&a.take());
    let mut b = Dl::open(&s, host("b"));
    let second = parent_ids(&b.take());
    assert_eq!(first.len(), 1);
    assert_ne!(first, second, "the second child goes to the parent without children");
    // A finished child no longer loads its parent.
    a.send(Req::Finished(proto::Finished {}));
    b.send(Req::Finished(proto::Finished {}));
    let st = s.lock();
    assert!(st.hosts.values().all(|h| h.children == 0));
}

#[test]
fn with_k_1_the_second_peer_pipelines_from_the_first() {
    let s = sched(|_| {});
    let mut a = Dl::open(&s, host("a"));
    assert_eq!(last(&a.take()), "back_to_source");
    let mut b = Dl::open(&s, host("b"));
    assert_eq!(parents(&b.take()), Some(vec![("a".to_owned(), vec![])]));
    a.piece(2, "", &sha(2));
    let msgs = b.take();
    assert!(
        matches!(&msgs[..], [Kind::PieceDigests(_), Kind::PieceAvailable(p)] if p.host_id == "a" && p.pieces == [2])
    );
}

#[test]
fn the_origin_limit_counts_fetchers_per_task() {
    for (k, expect) in [(1, "wait"), (2, "back_to_source")] {
        // Different idcs with idc_only: nobody can be a parent of anyone else.
        let s = sched(|c| (c.origin_limit, c.idc_only) = (k, true));
        let mut a = Dl::open(&s, at("a", "1", ""));
        assert_eq!(last(&a.take()), "back_to_source");
        let mut b = Dl::open(&s, at("b", "2", ""));
        assert_eq!(last(&b.take()), expect, "K={k}");
        let mut c = Dl::open(&s, at("c", "3", ""));
        assert_eq!(last(&c.take()), "wait", "K={k}");
    }
}

#[test]
fn waiting_peers_go_to_the_origin_when_the_fetcher_fails_or_leaves() {
    let s = sched(|c| c.idc_only = true);
    let mut a = Dl::open(&s, at("a", "1", ""));
    let mut b = Dl::open(&s, at("b", "2", ""));
    let mut c = Dl::open(&s, at("c", "3", ""));
    assert_eq!((last(&a.take()), last(&b.take()), last(&c.take())), ("back_to_source", "wait", "wait"));
    a.send(Req::Failed(proto::Failed { reason: "origin said 500".into(), ..Default::default() }));
    let (b_msgs, c_msgs) = (b.take(), c.take());
    // One of them takes the freed slot; the other keeps waiting, untold.
    let mut got = [last(&b_msgs), last(&c_msgs)];
    got.sort();
    assert_eq!(got, ["back_to_source", "nothing"]);
    let (fetcher, mut waiter) = if last(&b_msgs) == "back_to_source" { (b, c) } else { (c, b) };
    drop(fetcher);
    assert_eq!(last(&waiter.take()), "back_to_source");
    assert_eq!(stat(&s).peers.len(), 1, "a failed, the fetcher left holding nothing");
}

#[test]
fn waiting_peers_get_parents_as_soon_as_a_candidate_appears() {
    let s = sched(|c| c.idc_only = true);
    let mut a = Dl::open(&s, at("a", "1", ""));
    let mut b = Dl::open(&s, at("b", "2", ""));
    let mut c = Dl::open(&s, at("c", "2", ""));
    a.take();
    assert_eq!((last(&b.take()), last(&c.take())), ("wait", "wait"));
    holder(&s, at("h", "2", ""));
    // Whichever is decided second also gets the first, now downloading, below the holder.
    assert_eq!(parent_ids(&b.take())[0], "h");
    assert_eq!(parent_ids(&c.take())[0], "h");
}

#[test]
fn a_seed_is_asked_for_a_new_task_and_its_waiters_get_it_as_parent() {
    let s = sched(|_| {});
    announce(&s, proto::Host { seed: true, ..host("seed") }, vec![]);
    let mut sub = s.seed_tasks(&proto::SeedTasksRequest { host_id: "seed".into() }).expect("seed stream");
    announce(&s, host("a"), vec![]);
    let source =
        proto::Source { registry: "https://r.example".into(), repository: "lib/x".into(), ..Default::default() };
    let mut a = Dl::register(&s, Register { source: Some(source.clone()), ..reg("a") });
    assert_eq!(last(&a.take()), "wait");
    announce(&s, host("b"), vec![]);
    let mut b = Dl::register(&s, Register { source: Some(source.clone()), ..reg("b") });
    assert_eq!(last(&b.take()), "wait");
    let task = sub.rx_try().expect("seed task");
    assert_eq!((task.digest.as_str(), task.length, task.source), (D, u64::from(N) * PS, Some(source.clone())));
    assert!(sub.rx_try().is_none(), "asked once per task");
    assert_eq!(s.metrics().decisions(DecisionKind::Seed), 1);

    // The seed registers with the source it was given.
    let mut seed = Dl::register(&s, Register { source: Some(source), ..reg("seed") });
    assert_eq!(last(&seed.take()), "back_to_source");
    // The first waiter decided gets the seed; the second the seed and, pipelining, the first.
    let (pa, pb) = (parent_ids(&a.take()), parent_ids(&b.take()));
    assert!(pa.contains(&"seed".to_owned()) && pb.contains(&"seed".to_owned()), "{pa:?} {pb:?}");
    assert_eq!(pa.len() + pb.len(), 3);
}

/// A client's token reaches seeds only from a scheduler whose every caller showed a cluster
/// certificate; otherwise whoever reaches the port could announce a seed and collect tokens.
#[test]
fn credentials_reach_seeds_only_under_mutual_tls() {
    for (mutual, expected) in [(false, ""), (true, "Bearer t")] {
        let s = sched(|c| {
            let tls = crate::ServerTls { cert: vec![], key: vec![], client_ca: Some(vec![]), seed_name: None };
            c.tls = mutual.then_some(tls);
        });
        announce(&s, proto::Host { seed: true, ..host("seed") }, vec![]);
        let mut sub = s.seed_tasks(&proto::SeedTasksRequest { host_id: "seed".into() }).expect("seed stream");
        announce(&s, host("a"), vec![]);
        let source = proto::Source {
            registry: "https://r.example".into(),
            repository: "private/x".into(),
            credential: "Bearer t".into(),
            ..Default::default()
        };
        assert!(!format!("{source:?}").contains("Bearer"), "Debug shows the credential");
        let _a = Dl::register(&s, Register { source: Some(source), ..reg("a") });
        let task = sub.rx_try().expect("seed task");
        assert_eq!(task.source.map(|s| s.credential).as_deref(), Some(expected), "mutual TLS: {mutual}");
    }
}

#[test]
fn a_seed_that_does_not_come_or_goes_away_leaves_the_origin_rules() {
    let s = sched(|_| {});
    announce(&s, proto::Host { seed: true, ..host("seed") }, vec![]);
    let sub = s.seed_tasks(&proto::SeedTasksRequest { host_id: "seed".into() }).expect("seed stream");
    let mut a = Dl::open(&s, host("a"));
    assert_eq!(last(&a.take()), "wait");
    s.tick(std::time::Instant::now() + crate::decide::SEED_WAIT);
    assert_eq!(last(&a.take()), "back_to_source");

    let s = sched(|_| {});
    announce(&s, proto::Host { seed: true, ..host("seed") }, vec![]);
    let sub2 = s.seed_tasks(&proto::SeedTasksRequest { host_id: "seed".into() }).expect("seed stream");
    let mut a = Dl::open(&s, host("a"));
    assert_eq!(last(&a.take()), "wait");
    drop(sub2);
    assert_eq!(last(&a.take()), "back_to_source");
    drop(sub);

    // A seed host that leaves while asked: same.
    let s = sched(|_| {});
    announce(&s, proto::Host { seed: true, ..host("seed") }, vec![]);
    let _sub3 = s.seed_tasks(&proto::SeedTasksRequest { host_id: "seed".into() }).expect("seed stream");
    let mut a = Dl::open(&s, host("a"));
    assert_eq!(last(&a.take()), "wait");
    s.leave_host(&proto::LeaveHostRequest { host_id: "seed".into() }).expect("leave");
    assert_eq!(last(&a.take()), "back_to_source");
}

#[test]
fn a_parent_children_measured_fast_ranks_above_a_slow_one() {
    for _ in 0..10 {
        let s = sched(|_| {});
        holder(&s, host("fast"));
        holder(&s, host("slow"));
        let mut x = Dl::open(&s, host("x"));
        assert_eq!(parent_ids(&x.take()).len(), 2);
        for (n, parent, cost_micros) in [(0, "fast", 1_000), (1, "slow", 1_000_000)] {
            let p = proto::PieceFinished { number: n, parent_id: parent.into(), sha256: String::new(), cost_micros };
            x.send(Req::PieceFinished(p));
        }
        x.send(Req::Finished(proto::Finished {}));
        let mut z = Dl::open(&s, host("z"));
        assert_eq!(parent_ids(&z.take())[0], "fast");
    }
}

#[test]
fn only_seed_hosts_may_open_the_seed_stream() {
    let s = sched(|_| {});
    announce(&s, host("a"), vec![]);
    let err = s.seed_tasks(&proto::SeedTasksRequest { host_id: "a".into() }).err();
    assert!(matches!(err, Some(crate::SchedulerError::FailedPrecondition(_))));
    let err = s.seed_tasks(&proto::SeedTasksRequest { host_id: "nobody".into() }).err();
    assert!(matches!(err, Some(crate::SchedulerError::FailedPrecondition(_))));
}

impl<T> crate::TaskSubscription<T> {
    fn rx_try(&mut self) -> Option<T> {
        use futures_util::FutureExt;
        self.recv().now_or_never().flatten()
    }
}

#[test]
fn a_task_without_a_source_is_never_sent_to_a_seed() {
    let s = sched(|_| {});
    announce(&s, proto::Host { seed: true, ..host("seed") }, vec![]);
    let mut sub = s.seed_tasks(&proto::SeedTasksRequest { host_id: "seed".into() }).expect("seed stream");
    announce(&s, host("a"), vec![]);
    let mut a = Dl::register(&s, Register { source: None, ..reg("a") });
    assert_eq!(last(&a.take()), "back_to_source");
    assert!(sub.rx_try().is_none(), "a seed was asked for a task it cannot fetch");
}
