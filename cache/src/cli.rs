//! `damselfly cache`: the admin socket's client. Names are checked here before the daemon is
//! asked; an export is written by this process (a clone or a copy of the descriptor the
//! daemon passes) into a temporary file beside the target, synced and renamed over it.

use std::fs::File;
use std::io::{self, IsTerminal};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use damselfly_p2p::data_dir::default_data_dir;
use damselfly_proto::cache_name::{label, CacheName, MAX_REPLICAS};
use indicatif::{ProgressBar, ProgressStyle};

use crate::protocol::{EntryInfo, ErrorKind, Phase, Reply, Request};
use crate::server::socket_path;
use crate::wire::Conn;

/// Exit status of a command that found no such entry.
pub const EXIT_NOT_FOUND: i32 = 3;
/// Exit status of any other failure.
pub const EXIT_FAILED: i32 = 1;
/// Exit status of an import that is kept here but not yet on as many nodes as it asked.
pub const EXIT_REPLICAS_SHORT: i32 = 4;

#[derive(Debug, Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
    /// The data directory of the daemon to ask (the daemon's own default when not given).
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print the result as one JSON object on stdout, and no progress.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Import a file into the P2P cache under an id (and a tag).
    Import {
        file: PathBuf,
        #[command(flatten)]
        name: NameArgs,
        /// Nodes that should keep it, this one included; the cluster has the others fetch it.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_REPLICAS)))]
        replicas: u32,
        /// Every holder drops it after this long (`90s`, `30m`, `12h`, `7d`); kept until
        /// deleted when not given.
        #[arg(long, value_parser = damselfly_proto::cache_name::parse_ttl)]
        ttl: Option<Duration>,
    },
    /// Write the content an id names to a file, fetching it from peers if this node lacks it.
    Export {
        #[command(flatten)]
        name: NameArgs,
        /// Where to write it; replaced atomically.
        #[arg(short = 'O', long = "output", value_name = "PATH")]
        output: PathBuf,
    },
    /// What an id names: length, digest, holders, created, expiry.
    Stat {
        #[command(flatten)]
        name: NameArgs,
        /// As this node keeps it, without asking the scheduler.
        #[arg(long)]
        local: bool,
    },
    /// Drop an id here, or everywhere.
    Delete {
        #[command(flatten)]
        name: NameArgs,
        /// Have every node that keeps it drop it.
        #[arg(long)]
        all: bool,
    },
    /// The entries this node keeps.
    List,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    /// `[A-Za-z0-9._-]`, 1 to 128 characters.
    #[arg(long)]
    pub id: String,
    /// `[A-Za-z0-9._-]`, up to 128 characters.
    #[arg(long, default_value = "")]
    pub tag: String,
}

/// A failed command: the message for stderr and the exit status.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub code: i32,
}

impl Failure {
    fn new(message: impl Into<String>) -> Failure {
        Failure { message: message.into(), code: EXIT_FAILED }
    }
}

/// A connection to the daemon's admin socket.
pub struct Client {
    conn: Conn,
}

impl Client {
    /// Connects to the daemon serving `data_dir`; says plainly when none does.
    pub async fn connect(data_dir: &Path) -> Result<Client, Failure> {
        let path = socket_path(data_dir);
        match tokio::net::UnixStream::connect(&path).await {
            Ok(s) => Ok(Client { conn: Conn::client(s) }),
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
                Err(Failure::new(format!(
                    "no damselfly daemon is running with data directory {} (no one answers at {})",
                    data_dir.display(),
                    path.display()
                )))
            }
            Err(e) => Err(Failure::new(format!("cannot reach the daemon at {}: {e}", path.display()))),
        }
    }

    /// Sends `req` (with `fd`), hands progress lines to `progress`, and returns the final reply
    /// with the descriptor that came with it.
    pub async fn call(
        &mut self,
        req: &Request,
        fd: Option<&File>,
        mut progress: impl FnMut(Phase, u64, u64),
    ) -> Result<(Reply, Option<OwnedFd>), Failure> {
        let lost = |e: io::Error| Failure::new(format!("the daemon: {e}"));
        self.conn.send(req, fd.map(|f| f.as_fd())).await.map_err(lost)?;
        loop {
            match self.conn.recv::<Reply>().await.map_err(lost)? {
                Some(Reply::Progress { phase, done, total }) => progress(phase, done, total),
                Some(reply) => return Ok((reply, self.conn.take_fd())),
                None => return Err(Failure::new("the daemon closed the connection")),
            }
        }
    }
}

/// Runs the command; the exit status on failure says why.
pub async fn run(args: &CacheArgs) -> Result<(), Failure> {
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let name = |n: &NameArgs| CacheName::new(&n.id, &n.tag).map_err(|e| Failure::new(e.to_string()));
    // Everything that can be checked here is, before the daemon is asked.
    let (req, file, output) = match &args.command {
        CacheCommand::Import { file, name: n, replicas, ttl } => {
            let n = name(n)?;
            let f = File::open(file).map_err(|e| Failure::new(format!("{}: {e}", file.display())))?;
            if !f.metadata().is_ok_and(|m| m.is_file()) {
                return Err(Failure::new(format!("{}: not a regular file", file.display())));
            }
            let req = Request::Import {
                id: n.id().into(),
                tag: n.tag().into(),
                replicas: *replicas,
                ttl_secs: ttl.map(|t| t.as_secs()),
            };
            (req, Some(f), None)
        }
        CacheCommand::Export { name: n, output } => {
            let n = name(n)?;
            (Request::Export { id: n.id().into(), tag: n.tag().into() }, None, Some(Output::check(output)?))
        }
        CacheCommand::Stat { name: n, local } => {
            let n = name(n)?;
            (Request::Stat { id: n.id().into(), tag: n.tag().into(), local: *local }, None, None)
        }
        CacheCommand::Delete { name: n, all } => {
            let n = name(n)?;
            (Request::Delete { id: n.id().into(), tag: n.tag().into(), all: *all }, None, None)
        }
        CacheCommand::List => (Request::List, None, None),
    };
    let mut client = Client::connect(&data_dir).await?;
    // Interrupted, a half-written file beside the target goes with the command (watched for
    // before the file exists, so that no signal comes between).
    let interrupted = match &output {
        Some(o) => Some(on_signal_remove(o.tmp.clone())?),
        None => None,
    };
    // An export's file in the target's directory: the daemon writes content from peers into it.
    let out = output.as_ref().map(Output::create).transpose()?;
    let mut show = Show::new(!args.json);
    let started = std::time::Instant::now();
    let sent = file.as_ref().or(out.as_ref().map(|o| &o.file));
    let called = client.call(&req, sent, |phase, done, total| show.progress(phase, done, total)).await;
    let answered = started.elapsed();
    show.done();
    let finished = match (called, &output, out) {
        (Ok((reply, fd)), Some(output), Some(out)) => {
            let written = export_reply(reply, fd, output, &out, &mut show);
            if written.is_err() {
                output.discard(&out);
            }
            written.map(|exported| Some((exported, output)))
        }
        (Ok((reply, _)), _, _) => other_reply(reply, args.json).map(|()| None),
        (Err(e), output, out) => {
            if let (Some(o), Some(out)) = (output, out) {
                o.discard(&out);
            }
            Err(e)
        }
    };
    if let Some(i) = interrupted {
        i.abort();
    }
    let Some(((entry, how, from_peers), output)) = finished? else { return Ok(()) };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let json = serde_json::json!({
        "exported": entry, "path": output.path, "from_peers": from_peers, "written_by": how,
        "daemon_ms": ms(answered), "write_ms": ms(started.elapsed().saturating_sub(answered)),
    });
    print(args.json, &json, || {
        format!(
            "{} → {} ({} bytes, {}; {how})",
            name_of(&entry),
            output.path.display(),
            entry.length,
            if from_peers { "from peers" } else { "held here" }
        )
    });
    Ok(())
}

/// Finishes an export from the daemon's answer: content it wrote into `out` is put in place;
/// content it holds (its descriptor beside the answer) is cloned or copied into `out` first.
/// Returns the entry, how the file was written, and whether the content came from peers.
fn export_reply(
    reply: Reply,
    fd: Option<OwnedFd>,
    output: &Output,
    out: &OutFile,
    show: &mut Show,
) -> Result<(EntryInfo, &'static str, bool), Failure> {
    match reply {
        Reply::Written { entry } => {
            output.place(out)?;
            Ok((entry, "written as peers delivered it", true))
        }
        Reply::Ready { entry, from_peers } => {
            let fd = fd.ok_or_else(|| Failure::new("the daemon sent no content"))?;
            let how = output.fill(out, File::from(fd), entry.length, show)?;
            show.done();
            Ok((entry, how, from_peers))
        }
        Reply::Error { kind, message } => {
            let code = if kind == ErrorKind::NotFound { EXIT_NOT_FOUND } else { EXIT_FAILED };
            Err(Failure { message, code })
        }
        _ => Err(Failure::new("the daemon answered an export with something else")),
    }
}

/// What the other commands print of the daemon's answer.
fn other_reply(reply: Reply, json: bool) -> Result<(), Failure> {
    match reply {
        Reply::Error { kind, message } => {
            let code = if kind == ErrorKind::NotFound { EXIT_NOT_FOUND } else { EXIT_FAILED };
            Err(Failure { message, code })
        }
        Reply::Ready { .. } | Reply::Written { .. } => Err(Failure::new("the daemon sent content nobody asked for")),
        Reply::Imported { entry, placement } => {
            print(json, &serde_json::json!({"imported": entry, "placement": placement}), || {
                let mut s = format!("{} = {} ({} bytes, {placement})", name_of(&entry), entry.digest, entry.length);
                if let Some(h) = &entry.holders {
                    s += &format!("; kept on {} of {} nodes", h.len(), entry.replicas);
                }
                s
            });
            let kept_on = entry.holders.as_ref().map_or(1, Vec::len);
            if kept_on < entry.replicas as usize {
                return Err(Failure {
                    message: format!(
                        "imported, but kept on {kept_on} of {} nodes so far; the cluster goes on asking (see `damselfly cache stat`)",
                        entry.replicas
                    ),
                    code: EXIT_REPLICAS_SHORT,
                });
            }
            Ok(())
        }
        Reply::Stat { entry } => {
            print(json, &serde_json::json!({"entry": entry}), || describe(&entry));
            Ok(())
        }
        Reply::Deleted { everywhere } => {
            print(json, &serde_json::json!({"deleted": everywhere_label(everywhere)}), || {
                format!("deleted {}", everywhere_label(everywhere))
            });
            Ok(())
        }
        Reply::Entries { entries } => {
            print(json, &serde_json::json!({"entries": entries}), || {
                entries.iter().map(describe).collect::<Vec<_>>().join("\n")
            });
            Ok(())
        }
        Reply::Progress { .. } => Err(Failure::new("the daemon sent progress as an answer")),
    }
}

fn everywhere_label(everywhere: bool) -> &'static str {
    if everywhere {
        "everywhere"
    } else {
        "here"
    }
}

fn print(json: bool, value: &serde_json::Value, text: impl FnOnce() -> String) {
    if json {
        println!("{value}");
    } else {
        let t = text();
        if !t.is_empty() {
            println!("{t}");
        }
    }
}

fn name_of(e: &EntryInfo) -> String {
    label(&e.id, &e.tag)
}

fn describe(e: &EntryInfo) -> String {
    let mut s = format!("{}\tlength {}\tdigest {}\tcreated {}", name_of(e), e.length, e.digest, secs(e.created_ms));
    match e.expires_ms {
        Some(t) => s += &format!("\texpires {}", secs(t)),
        None => s += "\tno expiry",
    }
    s += &format!("\treplicas {}", e.replicas);
    if let Some(url) = &e.url {
        s += &format!("\turl {url}");
    }
    if let Some(h) = &e.holders {
        s += &format!("\tholders {}", if h.is_empty() { "-".to_owned() } else { h.join(",") });
    }
    s
}

/// An RFC 3339 time in UTC, to the second.
fn secs(ms: u64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| format!("@{}", ms / 1000))
}

/// Progress: a bar on a terminal, a plain line a second elsewhere, nothing with `--json`.
struct Show {
    bar: Option<ProgressBar>,
    lines: bool,
    phase: Option<Phase>,
    last_line: Option<std::time::Instant>,
}

impl Show {
    fn new(enabled: bool) -> Show {
        let terminal = std::io::stderr().is_terminal();
        Show { bar: None, lines: enabled && !terminal, phase: None, last_line: None }.with_bar(enabled && terminal)
    }

    fn with_bar(mut self, on: bool) -> Show {
        if on {
            let bar = ProgressBar::new(0);
            let style =
                ProgressStyle::with_template("{prefix:9} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
            bar.set_style(style);
            self.bar = Some(bar);
        }
        self
    }

    fn progress(&mut self, phase: Phase, done: u64, total: u64) {
        let label = match phase {
            Phase::Hashing => "hashing",
            Phase::Fetching => "fetching",
            Phase::Replicas => "replicas",
            Phase::Copying => "writing",
        };
        if let Some(bar) = &self.bar {
            if self.phase != Some(phase) {
                bar.reset();
                bar.set_prefix(label);
                if phase == Phase::Replicas {
                    bar.set_style(
                        ProgressStyle::with_template("{prefix:9} [{bar:30}] {pos}/{len} nodes")
                            .unwrap_or_else(|_| ProgressStyle::default_bar())
                            .progress_chars("=> "),
                    );
                }
            }
            bar.set_length(total);
            bar.set_position(done);
        } else if self.lines {
            let due = self.phase != Some(phase)
                || done >= total
                || self.last_line.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
            if due {
                let unit = if phase == Phase::Replicas { "nodes" } else { "bytes" };
                eprintln!("{label}: {done} of {total} {unit}");
                self.last_line = Some(std::time::Instant::now());
            }
        }
        self.phase = Some(phase);
    }

    fn done(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        self.phase = None;
    }
}

/// The file an export writes.
struct Output {
    path: PathBuf,
    dir: PathBuf,
    /// Where it is written first, beside it.
    tmp: PathBuf,
}

impl Output {
    /// Refuses a target whose directory does not exist before anything is fetched.
    fn check(path: &Path) -> Result<Output, Failure> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(Failure::new(format!("{}: the directory {} does not exist", path.display(), dir.display())));
        }
        if path.is_dir() {
            return Err(Failure::new(format!("{}: is a directory", path.display())));
        }
        let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = dir.join(format!(".{file_name}.damselfly-{}.tmp", std::process::id()));
        Ok(Output { path: path.to_owned(), dir, tmp })
    }

    /// Creates the file the content is written into, in the target's directory: a file with
    /// no name where the filesystem allows (an export killed at any point leaves nothing), else
    /// a new one beside the target.
    fn create(&self) -> Result<OutFile, Failure> {
        let fail = |e: io::Error| Failure::new(format!("{}: {e}", self.path.display()));
        let unnamed = std::fs::OpenOptions::new().write(true).mode(0o644).custom_flags(libc::O_TMPFILE).open(&self.dir);
        if let Ok(file) = unnamed {
            return Ok(OutFile { file, named: false });
        }
        let file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o644).open(&self.tmp).map_err(fail)?;
        Ok(OutFile { file, named: true })
    }

    /// Writes `len` bytes of `src` into `out` (a clone where the filesystem allows, else an
    /// in-kernel copy), syncs it and puts it in place. Returns how it was written.
    fn fill(&self, out: &OutFile, src: File, len: u64, show: &mut Show) -> Result<&'static str, Failure> {
        let how = copy(&src, &out.file, len, show).and_then(|how| out.file.sync_all().map(|()| how));
        let how = how.map_err(|e| Failure::new(format!("{}: {e}", self.path.display())))?;
        self.place(out)?;
        Ok(how)
    }

    /// Puts the written, synced file in place: named beside the target if it has no name yet,
    /// renamed over the target, and the directory synced.
    fn place(&self, out: &OutFile) -> Result<(), Failure> {
        let fail = |e: io::Error| Failure::new(format!("{}: {e}", self.path.display()));
        if !out.named {
            let proc_path = std::ffi::CString::new(format!("/proc/self/fd/{}", out.file.as_raw_fd()))
                .map_err(|e| fail(io::Error::other(e)))?;
            let tmp = std::ffi::CString::new(self.tmp.as_os_str().as_encoded_bytes())
                .map_err(|e| fail(io::Error::other(e)))?;
            // SAFETY: two NUL-terminated paths; linkat follows the descriptor's magic link.
            let linked = unsafe {
                libc::linkat(libc::AT_FDCWD, proc_path.as_ptr(), libc::AT_FDCWD, tmp.as_ptr(), libc::AT_SYMLINK_FOLLOW)
            };
            if linked != 0 {
                return Err(fail(io::Error::last_os_error()));
            }
        }
        let placed = std::fs::rename(&self.tmp, &self.path).and_then(|()| File::open(&self.dir)?.sync_all());
        placed.map_err(|e| {
            let _ = std::fs::remove_file(&self.tmp);
            fail(e)
        })
    }

    /// Nothing is left beside the target on failure: a named file is removed (one with no
    /// name goes with its descriptor).
    fn discard(&self, out: &OutFile) {
        if out.named {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The file an export is written into.
struct OutFile {
    file: File,
    /// Created beside the target under [`Output::tmp`], where files with no name cannot be.
    named: bool,
}

/// Removes `tmp` and exits on SIGINT or SIGTERM, from now on.
fn on_signal_remove(tmp: PathBuf) -> Result<tokio::task::JoinHandle<()>, Failure> {
    use tokio::signal::unix::{signal, SignalKind};
    let watch = |kind| signal(kind).map_err(|e| Failure::new(format!("cannot watch for signals: {e}")));
    let (mut int, mut term) = (watch(SignalKind::interrupt())?, watch(SignalKind::terminate())?);
    Ok(tokio::spawn(async move {
        let code = tokio::select! {
            _ = int.recv() => 130,
            _ = term.recv() => 143,
        };
        let _ = std::fs::remove_file(&tmp);
        std::process::exit(code);
    }))
}

fn copy(src: &File, out: &File, len: u64, show: &mut Show) -> io::Result<&'static str> {
    // SAFETY: FICLONE on two descriptors we own; no memory is involved.
    if unsafe { libc::ioctl(out.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0 {
        return Ok("reflink");
    }
    let mut done = 0u64;
    while done < len {
        let chunk = (len - done).min(64 << 20) as usize;
        // SAFETY: copy_file_range between two descriptors we own, offsets advanced by the kernel.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                std::ptr::null_mut(),
                out.as_raw_fd(),
                std::ptr::null_mut(),
                chunk,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            // Another filesystem (EXDEV), or one without the call: read and write.
            let unsupported =
                matches!(e.raw_os_error(), Some(libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS));
            if done == 0 && unsupported {
                return read_write(src, out, len, show);
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the content ended early"));
        }
        done += n as u64;
        show.progress(Phase::Copying, done, len);
    }
    Ok("copy")
}

/// Copies `len` bytes from the start of `src` to `out` through a buffer.
fn read_write(src: &File, out: &File, len: u64, show: &mut Show) -> io::Result<&'static str> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 4 << 20];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], done)?;
        out.write_all_at(&buf[..n], done)?;
        done += n as u64;
        show.progress(Phase::Copying, done, len);
    }
    Ok("copy")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_into_a_missing_directory_is_refused_before_anything_is_asked() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Output::check(&dir.path().join("nope/out")).is_err());
        assert!(Output::check(dir.path()).is_err());
        assert!(Output::check(&dir.path().join("out")).is_ok());
    }

    #[test]
    fn a_copy_to_another_filesystem_falls_back_to_read_and_write() {
        let mut src = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut src, &vec![9u8; 5 << 20]).unwrap();
        let out = tempfile::tempfile().unwrap();
        let mut show = Show::new(false);
        assert_eq!(read_write(&src, &out, 5 << 20, &mut show).unwrap(), "copy");
        let mut back = vec![0u8; 5 << 20];
        std::os::unix::fs::FileExt::read_exact_at(&out, &mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 9));
    }
}
