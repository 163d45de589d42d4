//! Where a download's responses go: a `Download` stream of its own, or the `Downloads` session
//! stream its host shares between all its downloads.
//!
//! A download loses its outbox when its stream ends, when a newer registration of the same
//! download replaces it, when it fails, or when its reader stops reading. A stream of its own
//! ends when its sender is dropped; a download in a session is told with an `Ended` message
//! instead, since the session goes on.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use prost::Message;
use tokio::sync::mpsc;

use crate::proto::download_response::Kind;
use crate::proto::session_response::Kind as SessionKind;
use crate::proto::{DownloadResponse, Ended, SessionResponse};

/// Messages queued for one host's session before it counts as not reading. A session carries
/// all of a host's downloads (the layers of the images it pulls), so it gets room for many.
pub(crate) const SESSION_QUEUE: usize = 65_536;
/// Bytes queued for one session before it counts as not reading: a registration can queue a
/// large message (the pinned digests of a 100,000-piece task are 7 MB), and a host that keeps
/// registering without reading must not make the scheduler hold its answers without bound.
pub(crate) const SESSION_BYTES: usize = 64 << 20;
/// Past this many bytes queued, a session reads no more requests until its host has read
/// some: requests that queue answers wait in the host's flow-control window instead of here.
pub(crate) const SESSION_HIGH_WATER: usize = 8 << 20;

/// The sending half of one host's session stream, shared by the downloads on it.
#[derive(Clone)]
pub struct SessionTx {
    tx: mpsc::Sender<Counted>,
    /// A message did not fit: the host is not reading, and the whole session ends (each of its
    /// downloads then falls back as after a broken stream).
    overflow: Arc<AtomicBool>,
    /// Encoded bytes queued and not yet handed to the transport.
    queued: Arc<AtomicUsize>,
}

impl SessionTx {
    pub fn new() -> (SessionTx, mpsc::Receiver<Counted>) {
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        (SessionTx { tx, overflow: Arc::default(), queued: Arc::default() }, rx)
    }

    pub fn overflowed(&self) -> bool {
        self.overflow.load(Ordering::Relaxed)
    }

    /// Bytes queued and not yet handed out.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// The count of queued bytes, for the reader to lower as it takes messages. Not a
    /// sender: the queue must still end once every sender is gone.
    pub fn budget(&self) -> Queued {
        Queued(self.queued.clone())
    }

    fn queue(&self, msg: SessionResponse) -> Result<(), Unsent> {
        let len = msg.encoded_len();
        if self.queued.fetch_add(len, Ordering::Relaxed) + len > SESSION_BYTES {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            return Err(self.not_reading());
        }
        match self.tx.try_send(Counted { len, msg }) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.queued.fetch_sub(len, Ordering::Relaxed);
                match e {
                    mpsc::error::TrySendError::Full(_) => Err(self.not_reading()),
                    mpsc::error::TrySendError::Closed(_) => Err(Unsent::Gone),
                }
            }
        }
    }

    fn not_reading(&self) -> Unsent {
        if !self.overflow.swap(true, Ordering::Relaxed) {
            tracing::warn!("scheduler session not read; ending it");
        }
        Unsent::NotReading
    }

    /// Tells the host that download `id` ended, with a gRPC status code (0: a clean end).
    pub fn end(&self, id: u64, code: i32, message: String) {
        let _ = self.queue(SessionResponse { id, kind: Some(SessionKind::Ended(Ended { code, message })) });
    }
}

/// A queued message with its encoded length, counted once.
pub struct Counted {
    len: usize,
    msg: SessionResponse,
}

/// Encoded bytes queued on a session (see `SessionTx::budget`).
pub struct Queued(Arc<AtomicUsize>);

impl Queued {
    /// A message was taken off the queue for the transport.
    pub fn taken(&self, counted: Counted) -> SessionResponse {
        self.0.fetch_sub(counted.len, Ordering::Relaxed);
        counted.msg
    }

    #[cfg(test)]
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// Why a response was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Unsent {
    /// The reader's queue is full.
    NotReading,
    /// The reader is gone.
    Gone,
}

pub(crate) enum Outbox {
    Stream(mpsc::Sender<DownloadResponse>),
    Session {
        to: SessionTx,
        id: u64,
        /// Dropping the outbox tells the host the download ended: set once the download is
        /// registered (a refused registration is answered with its reason instead), cleared
        /// when the host closed it itself.
        tell_end: bool,
    },
}

impl Outbox {
    pub fn session(to: &SessionTx, id: u64) -> Outbox {
        Outbox::Session { to: to.clone(), id, tell_end: false }
    }

    /// The outbox of a registered download: from now on its end is told.
    pub fn installed(mut self) -> Outbox {
        if let Outbox::Session { tell_end, .. } = &mut self {
            *tell_end = true;
        }
        self
    }

    /// Drops the outbox without an `Ended`.
    pub fn close_quietly(mut self) {
        if let Outbox::Session { tell_end, .. } = &mut self {
            *tell_end = false;
        }
    }

    pub fn send(&self, kind: Kind) -> Result<(), Unsent> {
        match self {
            Outbox::Stream(tx) => tx.try_send(DownloadResponse { kind: Some(kind) }).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => Unsent::NotReading,
                mpsc::error::TrySendError::Closed(_) => Unsent::Gone,
            }),
            Outbox::Session { to, id, .. } => {
                let response = DownloadResponse { kind: Some(kind) };
                to.queue(SessionResponse { id: *id, kind: Some(SessionKind::Response(response)) })
            }
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if let Outbox::Session { to, id, tell_end: true } = self {
            to.end(*id, 0, String::new());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Wait;

    fn wait() -> Kind {
        Kind::Wait(Wait { retry_after_ms: 1 })
    }

    #[test]
    fn a_session_download_is_told_it_ended_unless_it_was_closed_quietly() {
        let (to, mut rx) = SessionTx::new();
        let a = Outbox::session(&to, 7).installed();
        a.send(wait()).expect("queued");
        drop(a);
        Outbox::session(&to, 8).installed().close_quietly();
        drop(Outbox::session(&to, 9));
        let first = rx.try_recv().expect("response").msg;
        assert!(first.id == 7 && matches!(first.kind, Some(SessionKind::Response(_))));
        let second = rx.try_recv().expect("end").msg;
        assert!(second.id == 7 && matches!(second.kind, Some(SessionKind::Ended(Ended { code: 0, .. }))));
        assert!(rx.try_recv().is_err(), "a quiet close, and a refused registration, say nothing");
    }

    #[test]
    fn a_full_session_marks_the_whole_session_as_not_reading() {
        let (to, _rx) = SessionTx::new();
        let out = Outbox::session(&to, 1);
        for _ in 0..SESSION_QUEUE {
            out.send(wait()).expect("room");
        }
        assert_eq!(out.send(wait()), Err(Unsent::NotReading));
        assert!(to.overflowed());
        out.close_quietly();
    }

    #[test]
    fn a_session_holds_a_bounded_number_of_bytes_and_counts_what_is_taken() {
        use crate::proto::{PieceDigest, PieceDigests};
        let (to, mut rx) = SessionTx::new();
        let out = Outbox::session(&to, 1);
        let digest = |n| PieceDigest { number: n, sha256: "ab".repeat(32) };
        let big = || Kind::PieceDigests(PieceDigests { piece_size: 1, digests: (0..100_000).map(digest).collect() });
        let mut sent = 0;
        while out.send(big()).is_ok() {
            sent += 1;
        }
        assert!((1..=SESSION_BYTES / 7_000_000).contains(&sent), "{sent} messages of 7 MB queued");
        assert!(to.overflowed() && to.queued() <= SESSION_BYTES);
        let budget = to.budget();
        while let Ok(counted) = rx.try_recv() {
            budget.taken(counted);
        }
        assert_eq!(to.queued(), 0);
        out.close_quietly();
    }
}
