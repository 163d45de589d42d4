//! The `Downloads` stream: all downloads of one host over one stream it keeps open. Each
//! request names its download; responses come back tagged the same way. Opening a download
//! costs a message here, where a `Download` stream of its own costs a new HTTP/2 stream, its
//! headers and trailers, and a task on either side (what that cost is in `docs/benchmarks.md`,
//! scheduler load).

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::{FutureExt, Stream};
use tokio::sync::mpsc;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::{Status, Streaming};

use crate::download::DownloadHandle;
use crate::error::SchedulerError;
use crate::metrics::OpenStream;
use crate::outbox::{Counted, Queued, SessionTx, SESSION_HIGH_WATER};
use crate::proto::download_request::Kind as Req;
use crate::proto::{DownloadRequest, Register, SessionRequest, SessionResponse};
use crate::scheduler::Scheduler;
use crate::state::Map;

/// Downloads one session may have open at once.
const MAX_DOWNLOADS: usize = 4096;

/// May the caller act for this host id? (The seed check of `SchedulerService::act_for`.)
pub(crate) type ActFor = Box<dyn Fn(&str) -> Result<(), Status> + Send>;

/// Applies a host's requests and yields the responses they queue, from one poll, as the
/// `Download` stream does. The session ends when the host closes it, when it stops reading
/// (its queue overflowed) or when the scheduler shuts down; its open downloads close then.
pub(crate) struct SessionStream {
    core: Scheduler,
    act_for: ActFor,
    /// The host this session is for: its first registration names it, and every later one
    /// must name the same host.
    host: Option<String>,
    inbound: Option<Streaming<SessionRequest>>,
    downloads: Map<u64, DownloadHandle>,
    /// Dropped when the session ends, so that `rx` ends once the downloads let go of theirs.
    to: Option<SessionTx>,
    rx: mpsc::Receiver<Counted>,
    closing: Pin<Box<WaitForCancellationFutureOwned>>,
    error: Option<Status>,
    /// Lowered as messages are handed out; kept past the session's end.
    budget: Queued,
    _open: OpenStream,
}

impl SessionStream {
    pub fn new(core: Scheduler, act_for: ActFor, inbound: Streaming<SessionRequest>) -> Self {
        let (to, rx) = SessionTx::new();
        let closing = Box::pin(core.closing().cancelled_owned());
        let _open = core.metrics().stream_open("session");
        SessionStream {
            core,
            act_for,
            host: None,
            inbound: Some(inbound),
            downloads: Map::default(),
            budget: to.budget(),
            to: Some(to),
            rx,
            closing,
            error: None,
            _open,
        }
    }

    fn end(&mut self, error: Option<Status>) {
        self.inbound = None;
        // Closing quietly: the host learns from the end of the session itself.
        self.downloads.drain().for_each(|(_, handle)| handle.close_quietly());
        self.to = None;
        self.error = self.error.take().or(error);
    }

    fn apply(&mut self, SessionRequest { id, request }: SessionRequest) {
        let Some(kind) = request.and_then(|r| r.kind) else {
            // The host closed the download.
            if let Some(handle) = self.downloads.remove(&id) {
                handle.close_quietly();
            }
            return;
        };
        let outcome = match kind {
            Req::Register(reg) => self.register(id, reg).map_err(Some),
            kind => self.request(id, kind),
        };
        // Refused: the host is told why, unless it was told already; either way the download
        // is let go of.
        if let Err(tell) = outcome {
            if let (Some(status), Some(to)) = (tell, &self.to) {
                to.end(id, status.code() as i32, status.message().to_owned());
            }
            if let Some(handle) = self.downloads.remove(&id) {
                handle.close_quietly();
            }
        }
    }

    /// Applies one request of open download `id`. `Err(None)`: the download ended already
    /// (taken over, failed, dropped) and its end was told then.
    fn request(&mut self, id: u64, kind: Req) -> Result<(), Option<Status>> {
        // Unknown: ended by the scheduler already; the host learns from its `Ended`.
        let Some(handle) = self.downloads.get_mut(&id) else { return Ok(()) };
        match handle.send(DownloadRequest { kind: Some(kind) }) {
            Ok(()) => Ok(()),
            Err(SchedulerError::DownloadEnded(_)) => Err(None),
            Err(e) => {
                tracing::debug!(digest = %handle.digest(), host = %handle.host_id(), error = %e, "download request refused");
                Err(Some(Status::from(e)))
            }
        }
    }

    fn register(&mut self, id: u64, reg: Register) -> Result<(), Status> {
        let Some(to) = &self.to else { return Ok(()) };
        if self.downloads.contains_key(&id) {
            return Err(Status::invalid_argument(format!("download {id} is open already")));
        }
        if self.downloads.len() >= MAX_DOWNLOADS {
            return Err(Status::resource_exhausted(format!("more than {MAX_DOWNLOADS} downloads in one session")));
        }
        if self.host.as_ref().is_some_and(|host| *host != reg.host_id) {
            return Err(Status::invalid_argument("a session carries the downloads of one host"));
        }
        // At every registration, not only the first: the host may have become a seed since
        // (it announced again with its certificate) while this session was bound to its id.
        (self.act_for)(&reg.host_id)?;
        let host = reg.host_id.clone();
        let handle = self.core.download_in_session(reg, to, id)?;
        self.host.get_or_insert(host);
        self.downloads.insert(id, handle);
        Ok(())
    }
}

#[cfg(test)]
impl SessionStream {
    pub fn queued_bytes(&self) -> usize {
        self.budget.get()
    }

    pub fn is_open(&self) -> bool {
        self.to.is_some()
    }
}

impl Stream for SessionStream {
    type Item = Result<SessionResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.to.is_some() && this.closing.poll_unpin(cx).is_ready() {
            this.end(None);
        }
        while let Some(inbound) = this.inbound.as_mut() {
            // A host that is not reading its answers gets no more of them queued: its requests
            // wait until it has read some (see `SESSION_HIGH_WATER`).
            if this.to.as_ref().is_some_and(|to| to.overflowed() || to.queued() > SESSION_HIGH_WATER) {
                break;
            }
            match Pin::new(inbound).poll_next(cx) {
                Poll::Ready(Some(Ok(req))) => this.apply(req),
                Poll::Ready(Some(Err(status))) => {
                    tracing::debug!(error = %status, "scheduler session broke");
                    this.end(None);
                }
                Poll::Ready(None) => this.end(None),
                Poll::Pending => break,
            }
        }
        if this.to.as_ref().is_some_and(SessionTx::overflowed) {
            this.end(Some(Status::resource_exhausted("the session was not read")));
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(counted)) => Poll::Ready(Some(Ok(this.budget.taken(counted)))),
            Poll::Ready(None) => Poll::Ready(this.error.take().map(Err)),
            Poll::Pending => Poll::Pending,
        }
    }
}
