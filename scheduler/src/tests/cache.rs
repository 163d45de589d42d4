//! The P2P cache's names: what a put records, who is asked for replicas and in what order,
//! what a conflicting put, a deletion and a departed host do.

use std::time::Instant;

use damselfly_proto::cache_name::{CacheName, UrlVersion};

use super::{announce, holder, host, sched, D, N, PS};
use crate::proto::{self, hold_task::Kind as Hold, CacheEntry, HoldTask};
use crate::{Scheduler, SchedulerError, TaskSubscription};

fn entry(id: &str, replicas: u32) -> CacheEntry {
    CacheEntry {
        key: CacheName::new(id, "").unwrap().key(),
        id: id.into(),
        tag: String::new(),
        digest: D.into(),
        length: u64::from(N) * PS,
        created_ms: crate::cache::now_ms(),
        expires_ms: 0,
        replicas,
        url: String::new(),
    }
}

fn put(s: &Scheduler, host: &str, e: &CacheEntry) -> Result<(), SchedulerError> {
    s.put_cache_entry(proto::PutCacheEntryRequest { host_id: host.into(), entry: Some(e.clone()) })
}

fn holders(s: &Scheduler, e: &CacheEntry) -> Vec<String> {
    let stat = s.stat_cache_entry(&proto::StatCacheEntryRequest { key: e.key.clone() }).unwrap();
    let mut h = stat.holders;
    h.sort();
    h
}

fn stream(s: &Scheduler, id: &str) -> TaskSubscription<HoldTask> {
    s.preheat_tasks(&proto::PreheatTasksRequest { host_id: id.into() }).expect("preheat stream")
}

fn next(sub: &mut TaskSubscription<HoldTask>) -> Option<Hold> {
    use futures_util::FutureExt;
    sub.recv().now_or_never().flatten().and_then(|t| t.kind)
}

#[test]
fn replicas_go_to_seeds_first_and_then_to_no_one_else() {
    let s = sched(|_| {});
    holder(&s, host("a"));
    for id in ["b", "c"] {
        announce(&s, host(id), vec![]);
    }
    announce(&s, proto::Host { seed: true, ..host("seed") }, vec![]);
    let mut subs: Vec<_> = ["b", "c", "seed"].iter().map(|h| (h.to_string(), stream(&s, h))).collect();
    let e = entry("model", 2);
    put(&s, "a", &e).unwrap();
    let asked: Vec<String> =
        subs.iter_mut().filter_map(|(h, sub)| matches!(next(sub), Some(Hold::Keep(_))).then(|| h.clone())).collect();
    assert_eq!(asked, ["seed"], "one replica wanted, a seed first");
    // Asked already and within its time: nobody else is asked on the next rounds.
    s.tick(Instant::now());
    assert!(subs.iter_mut().all(|(_, sub)| next(sub).is_none()));
    // A replica counts once its host holds the content verified.
    assert!(put(&s, "seed", &e).is_err(), "the seed does not hold it yet");
    holder(&s, proto::Host { seed: true, ..host("seed") });
    put(&s, "seed", &e).unwrap();
    assert_eq!(holders(&s, &e), ["a", "seed"]);
}

#[test]
fn only_a_seed_names_a_preheated_file_and_others_may_then_hold_it() {
    let s = sched(|_| {});
    holder(&s, host("member"));
    holder(&s, proto::Host { seed: true, ..host("seed") });
    let url = "http://files.example/model.bin";
    let name = UrlVersion::from_headers(Some("\"v1\""), None, u64::from(N) * PS).unwrap().name(url);
    let e =
        CacheEntry { key: name.key(), id: name.id().into(), tag: name.tag().into(), url: url.into(), ..entry("x", 1) };
    // A member cannot name its bytes for a URL, nor take a URL's id without the URL.
    assert!(put(&s, "member", &e).is_err());
    assert!(put(&s, "member", &CacheEntry { url: String::new(), ..e.clone() }).is_err());
    assert!(put(&s, "seed", &CacheEntry { url: "http://files.example/other.bin".into(), ..e.clone() }).is_err());
    assert!(holders(&s, &e).is_empty());
    put(&s, "seed", &e).unwrap();
    put(&s, "member", &e).unwrap();
    assert_eq!(holders(&s, &e), ["member", "seed"]);
}

#[test]
fn a_seeds_failure_to_fetch_a_file_is_heard_only_from_the_seed_asked() {
    let s = sched(|_| {});
    let seed = proto::Host { seed: true, ..host("seed") };
    announce(&s, seed, vec![]);
    announce(&s, host("member"), vec![]);
    let mut seed_stream = stream(&s, "seed");
    let _member_stream = stream(&s, "member");
    let task = proto::UrlTask {
        url: "http://files.example/model.bin".into(),
        etag: "\"v1\"".into(),
        length: 10,
        ..Default::default()
    };
    let key = UrlVersion::from_headers(Some("\"v1\""), None, 10).unwrap().name(&task.url).key();
    assert!(!s.ask_to_fetch_url("member", task.clone()), "only seeds fetch files");
    assert!(s.ask_to_fetch_url("seed", task.clone()));
    assert!(matches!(next(&mut seed_stream), Some(Hold::FetchUrl(t)) if t == task));
    let report = |host: &str, reason: &str| proto::FailedUrlTaskRequest {
        host_id: host.into(),
        key: key.clone(),
        reason: reason.into(),
    };
    s.failed_url_task(&report("member", "made up")).unwrap();
    assert_eq!(s.url_failure(&key), None, "a host that was not asked is not heard");
    s.failed_url_task(&report("seed", "the origin answered 412\u{7}")).unwrap();
    let failure = s.url_failure(&key).expect("heard");
    assert_eq!((failure.host.as_str(), failure.reason.as_str()), ("seed", "the origin answered 412"));
    assert!(s.failed_url_task(&proto::FailedUrlTaskRequest { key: "x".into(), ..report("seed", "") }).is_err());
}

#[test]
fn a_name_for_other_content_is_refused_and_the_first_stands() {
    let s = sched(|_| {});
    holder(&s, host("a"));
    let other_digest = format!("sha256:{}", "b".repeat(64));
    let other_task = proto::TaskInfo {
        digest: other_digest.clone(),
        length: u64::from(N) * PS,
        piece_size: PS,
        piece_sha256: vec![],
    };
    announce(&s, host("b"), vec![other_task]);
    let e = entry("data", 1);
    put(&s, "a", &e).unwrap();
    let other = CacheEntry { digest: other_digest, ..e.clone() };
    assert!(matches!(put(&s, "b", &other), Err(SchedulerError::FailedPrecondition(_))));
    let stat = s.stat_cache_entry(&proto::StatCacheEntryRequest { key: e.key.clone() }).unwrap();
    assert_eq!(stat.entry.unwrap().digest, D);
    // A key that is not its name's, or a bad name, is refused outright.
    assert!(put(&s, "b", &CacheEntry { key: "0".repeat(64), ..e.clone() }).is_err());
    assert!(put(&s, "b", &CacheEntry { id: "../x".into(), ..e.clone() }).is_err());
    assert!(put(&s, "b", &CacheEntry { replicas: 0, ..e }).is_err());
}

#[test]
fn a_deleted_entry_is_dropped_by_its_holders_and_not_revived_by_a_late_announcement() {
    let s = sched(|_| {});
    holder(&s, host("a"));
    holder(&s, host("b"));
    let mut b = stream(&s, "b");
    let e = entry("old", 1);
    put(&s, "a", &e).unwrap();
    put(&s, "b", &e).unwrap();
    s.drop_cache_entry(&proto::DropCacheEntryRequest { host_id: "a".into(), key: e.key.clone(), everywhere: true })
        .unwrap();
    assert_eq!(next(&mut b), Some(Hold::Drop(e.key.clone())));
    assert!(s.stat_cache_entry(&proto::StatCacheEntryRequest { key: e.key.clone() }).unwrap().entry.is_none());
    // b missed it and announces the entry again: it is told once more, and nothing comes back.
    s.announce_host(proto::AnnounceHostRequest {
        host: Some(host("b")),
        cache_entries: vec![e.clone()],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(next(&mut b), Some(Hold::Drop(e.key.clone())));
    assert!(s.stat_cache_entry(&proto::StatCacheEntryRequest { key: e.key.clone() }).unwrap().entry.is_none());
    // Imported again after the deletion: a new entry.
    let again = CacheEntry { created_ms: e.created_ms + 1, ..e };
    put(&s, "a", &again).unwrap();
    assert_eq!(holders(&s, &again), ["a"]);
}

#[test]
fn a_host_that_leaves_holds_nothing_and_a_replacement_is_asked() {
    let s = sched(|_| {});
    holder(&s, host("a"));
    holder(&s, host("b"));
    announce(&s, host("c"), vec![]);
    let _b = stream(&s, "b");
    let mut c = stream(&s, "c");
    let e = entry("kept", 2);
    put(&s, "a", &e).unwrap();
    put(&s, "b", &e).unwrap();
    assert!(next(&mut c).is_none(), "two holders already");
    s.leave_host(&proto::LeaveHostRequest { host_id: "a".into() }).unwrap();
    assert_eq!(holders(&s, &e), ["b"]);
    s.tick(Instant::now());
    assert!(matches!(next(&mut c), Some(Hold::Keep(k)) if k.key == e.key));
}

#[test]
fn an_expired_entry_is_gone() {
    let s = sched(|_| {});
    holder(&s, host("a"));
    let e = CacheEntry { expires_ms: crate::cache::now_ms() + 50, ..entry("brief", 1) };
    put(&s, "a", &e).unwrap();
    assert_eq!(holders(&s, &e), ["a"]);
    std::thread::sleep(std::time::Duration::from_millis(60));
    assert!(s.stat_cache_entry(&proto::StatCacheEntryRequest { key: e.key.clone() }).unwrap().entry.is_none());
    // Announcing an expired entry records nothing.
    put(&s, "a", &e).unwrap();
    assert!(s.stat_cache_entry(&proto::StatCacheEntryRequest { key: e.key }).unwrap().entry.is_none());
}

#[test]
fn a_host_that_no_longer_lists_an_entry_no_longer_holds_it_and_is_not_asked_again_at_once() {
    let s = sched(|_| {});
    holder(&s, host("a"));
    holder(&s, host("b"));
    let mut b = stream(&s, "b");
    let e = entry("listed", 2);
    put(&s, "a", &e).unwrap();
    put(&s, "b", &e).unwrap();
    // b's periodic announcement lists nothing: it dropped the entry.
    let full = proto::AnnounceHostRequest { host: Some(host("b")), all_cache_entries: true, ..Default::default() };
    s.announce_host(full).unwrap();
    assert_eq!(holders(&s, &e), ["a"]);
    // A local delete says so too, and the host that deleted it is not asked straight back.
    put(&s, "b", &e).unwrap();
    s.drop_cache_entry(&proto::DropCacheEntryRequest { host_id: "b".into(), key: e.key.clone(), everywhere: false })
        .unwrap();
    assert_eq!(holders(&s, &e), ["a"]);
    while next(&mut b).is_some() {}
    s.tick(Instant::now());
    assert!(next(&mut b).is_none());
}
