//! What a scheduler reads from the network: membership proofs, and any sequence of announce,
//! register and download messages, however malformed, applied to one scheduler. Nothing may
//! panic, and the scheduler keeps answering.
#![no_main]

use damselfly_proto::member::{JoinKey, OwnerToken};
use damselfly_proto::v1::{download_request::Kind, AnnounceHostRequest, DownloadRequest, Register};
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
    // Messages are length-prefixed (one byte) and typed (one byte) chunks of the input.
    let mut rest = data;
    while rest.len() >= 2 {
        let (kind, len) = (rest[0] % 3, usize::from(rest[1]));
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
    let _ = scheduler.stat_task(&damselfly_proto::v1::StatTaskRequest { digest: "sha256:00".into() });
});
