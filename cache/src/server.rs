//! The admin socket: `<data-dir>/admin/cache.sock`, in a directory only the daemon's user can
//! enter, and answering only that user or root (checked by the peer's credentials). Each
//! request runs on a task of its own, so an import finishes even if its client goes away; an
//! export, which writes into the client's file, stops.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use damselfly_proto::cache_name::CacheName;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::error::CacheError;
use crate::keeper::{Cache, Exported};
use crate::protocol::{Reply, Request, SOCKET};
use crate::wire::Conn;

/// Clients served at once; more wait to be accepted.
const MAX_CLIENTS: usize = 64;
/// A client that sends nothing for this long between requests is closed.
const IDLE: Duration = Duration::from_secs(300);
/// A client that reads nothing of a reply for this long is closed.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// The socket's path for the daemon whose data directory is `data_dir`.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET)
}

/// Binds the socket, replacing a stale one (the daemon holds the data directory's lock, so no
/// other daemon serves it), in a directory made owner-only.
pub fn bind(data_dir: &Path) -> io::Result<UnixListener> {
    let path = socket_path(data_dir);
    let dir = path.parent().unwrap_or(data_dir);
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves `listener` until `shutdown`, then removes the socket.
pub async fn serve(cache: Arc<Cache>, listener: UnixListener, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { break };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let uid = stream.peer_cred().map(|c| c.uid());
        if !matches!(uid, Ok(u) if u == me || u == 0) {
            tracing::warn!(?uid, "admin socket: refused a client of another user");
            continue;
        }
        let cache = cache.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = stop.cancelled() => {}
                r = client(cache, stream) => if let Err(e) = r {
                    tracing::debug!(error = %e, "admin socket client ended");
                },
            }
        });
    }
    if let Ok(addr) = listener.local_addr() {
        if let Some(path) = addr.as_pathname() {
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn client(cache: Arc<Cache>, stream: UnixStream) -> io::Result<()> {
    let mut conn = Conn::new(stream);
    loop {
        let req = match tokio::time::timeout(IDLE, conn.recv::<Request>()).await {
            Err(_) | Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(req))) => req,
            Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
                let reply = CacheError::BadRequest(e.to_string()).reply();
                return conn.send(&reply, None).await;
            }
            Ok(Err(e)) => return Err(e),
        };
        let fd = conn.take_fd();
        let (tx, mut rx) = mpsc::channel(16);
        let export = matches!(req, Request::Export { .. });
        let mut op = Ongoing { task: tokio::spawn(handle(cache.clone(), req, fd, tx)), abort_on_drop: export };
        let (reply, file) = loop {
            tokio::select! {
                Some(p) = rx.recv() => send(&mut conn, &p, None).await?,
                done = &mut op.task => break done.unwrap_or_else(|e| (CacheError::Io(io::Error::other(e)).reply(), None)),
            }
        };
        while let Ok(p) = rx.try_recv() {
            send(&mut conn, &p, None).await?;
        }
        send(&mut conn, &reply, file.as_ref().map(|f| f.as_fd())).await?;
    }
}

/// A request being carried out. An export is stopped if its client goes away first (it would
/// write into a file the client removed); an import goes on, and its content is kept.
struct Ongoing {
    task: tokio::task::JoinHandle<(Reply, Option<File>)>,
    abort_on_drop: bool,
}

impl Drop for Ongoing {
    fn drop(&mut self) {
        if self.abort_on_drop {
            self.task.abort();
        }
    }
}

/// Sends a reply, giving up on a client that stops reading.
async fn send(conn: &mut Conn, reply: &Reply, fd: Option<std::os::fd::BorrowedFd<'_>>) -> io::Result<()> {
    tokio::time::timeout(SEND_TIMEOUT, conn.send(reply, fd))
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading")))
}

/// One request, its final reply, and the descriptor that goes with it (an export's).
async fn handle(
    cache: Arc<Cache>,
    req: Request,
    fd: Option<OwnedFd>,
    progress: mpsc::Sender<Reply>,
) -> (Reply, Option<File>) {
    let name = |id: &str, tag: &str| CacheName::new(id, tag).map_err(|e| CacheError::BadRequest(e.to_string()));
    let result = match req {
        Request::Import { id, tag, replicas, ttl_secs } => match (name(&id, &tag), fd) {
            (Err(e), _) => Err(e),
            (Ok(_), None) => Err(CacheError::BadRequest("an import passes the file's descriptor".into())),
            (Ok(n), Some(fd)) => cache
                .import(n, File::from(fd), replicas, ttl_secs.map(Duration::from_secs), &progress)
                .await
                .map(|(entry, placement)| (Reply::Imported { entry, placement: placement.label().into() }, None)),
        },
        Request::Export { id, tag } => match name(&id, &tag) {
            Err(e) => Err(e),
            Ok(n) => cache.export(&n, fd.map(File::from), &progress).await.map(|exported| match exported {
                Exported::Held(file, entry) => (Reply::Ready { entry, from_peers: false }, Some(file)),
                Exported::Written(entry) => (Reply::Written { entry }, None),
            }),
        },
        Request::Stat { id, tag, local } => match name(&id, &tag) {
            Err(e) => Err(e),
            Ok(n) => cache.stat(&n, local).await.map(|entry| (Reply::Stat { entry }, None)),
        },
        Request::Delete { id, tag, all } => match name(&id, &tag) {
            Err(e) => Err(e),
            Ok(n) => cache.delete(&n, all).await.map(|()| (Reply::Deleted { everywhere: all }, None)),
        },
        Request::List => Ok((Reply::Entries { entries: cache.list() }, None)),
    };
    result.unwrap_or_else(|e| (e.reply(), None))
}
