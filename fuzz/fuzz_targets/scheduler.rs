//! What a scheduler reads from the network: membership proofs, and any sequence of announce,
//! register, download and P2P cache messages, however malformed, applied to one scheduler,
//! with its periodic upkeep (replica placement) between them. Nothing may panic, and the
//! scheduler keeps answering.
#![no_main]

use damselfly_proto::member::{JoinKey, OwnerToken};
use damselfly_proto::v1::{
    download_request::Kind, AnnounceHostRequest, DownloadRequest, DropCacheEntryRequest, FailedUrlTaskRequest,
    PreheatTasksRequest, PutCacheEntryRequest, Register, StatCacheEntryRequest, UrlTask,
};
use damselfly_scheduler::{Scheduler, SchedulerConfig};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    // A membership proof as it arrives in a header, for any host and owner.
    if let Ok(s) = std::str::from_utf8(data) {
        let owner = OwnerToken::new([7; 32]);
        let _ = JoinKey::new(b"fuzz cluster secret").verify(s, &owner, s, 0);
        let _ = OwnerToken::parse(s);
    }
    let scheduler = Scheduler::new(SchedulerConfig { secret: b"fuzz".to_vec(), ..SchedulerConfig::default() });
    let mut downloads = Vec::new();
    let mut streams = Vec::new();
    // Messages are length-prefixed (one byte) and typed (one byte) chunks of the input.
    let mut rest = data;
    while rest.len() >= 2 {
        let (kind, len) = (rest[0] % 7, usize::from(rest[1]));
        let body = &rest[2..(2 + len).min(rest.len())];
        rest = &rest[(2 + len).min(rest.len())..];
        match kind {
            0 => {
                if let Ok(req) = AnnounceHostRequest::decode(body) {
                    let _ = scheduler.announce_host_by(req, Some(OwnerToken::new([1; 32]).owner()));
                }
            }
            1 => {
                if let Ok(reg) = Register::decode(body) {
                    if let Ok((handle, rx)) = scheduler.download(reg) {
                        downloads.push((handle, rx));
                    }
                }
            }
            3 => {
                if let Ok(req) = PutCacheEntryRequest::decode(body) {
                    let _ = scheduler.put_cache_entry(req);
                }
            }
            4 => {
                if let Ok(req) = DropCacheEntryRequest::decode(body) {
                    let _ = scheduler.drop_cache_entry(&req);
                }
                // A seed asked for a file (the URL field doubles as the host asked, so that both
                // vary), and its report of failing to fetch it.
                if let Ok(task) = UrlTask::decode(body) {
                    let _ = scheduler.ask_to_fetch_url(&task.url, task.clone());
                }
                if let Ok(req) = FailedUrlTaskRequest::decode(body) {
                    let _ = scheduler.failed_url_task(&req);
                    let _ = scheduler.url_failure(&req.key);
                }
                scheduler.tick(std::time::Instant::now());
            }
            5 => {
                if let Ok(req) = StatCacheEntryRequest::decode(body) {
                    let _ = scheduler.stat_cache_entry(&req);
                }
                // A host that takes what it is asked to hold or drop.
                if let Ok(req) = PreheatTasksRequest::decode(body) {
                    if let Ok(sub) = scheduler.preheat_tasks(&req) {
                        streams.push(sub);
                    }
                }
            }
            _ => {
                let Ok(req) = DownloadRequest::decode(body) else { continue };
                if matches!(req.kind, Some(Kind::Register(_))) || downloads.is_empty() {
                    continue;
                }
                let i = usize::from(body.first().copied().unwrap_or(0)) % downloads.len();
                let _ = downloads[i].0.send(req);
            }
        }
    }
    drop(downloads);
    drop(streams);
    let _ = scheduler.stat_task(&damselfly_proto::v1::StatTaskRequest { digest: "sha256:00".into() });
});
