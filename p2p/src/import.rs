//! Importing a file as a verified task (the P2P cache): placed in the store without copying
//! where the filesystem allows (a reflink, else a hard link), else copied; hashed once, the
//! whole content and every piece, on two threads; refused if the file changed meanwhile.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;

use crate::digest::{Algorithm, Digest, Hasher};
use crate::meta::PieceRecord;
use crate::piece::Layout;
use crate::store::{Store, StoreError};
use crate::task::TaskRef;

/// How an imported file came into the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// A copy-on-write clone: no bytes copied, and later changes to the file do not reach it.
    Reflink,
    /// Another name for the same file: no bytes copied, but the file must not change.
    HardLink,
    /// Copied while it was hashed.
    Copy,
}

impl Placement {
    pub fn label(self) -> &'static str {
        match self {
            Placement::Reflink => "reflink",
            Placement::HardLink => "hard link",
            Placement::Copy => "copy",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("not a regular file")]
    NotRegular,
    #[error("the file changed while it was imported; nothing was kept")]
    Changed,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<io::Error> for ImportError {
    fn from(e: io::Error) -> Self {
        ImportError::Store(StoreError::Io(e))
    }
}

pub struct Imported {
    pub task: TaskRef,
    pub placement: Placement,
}

/// What says a file's content is unchanged: its identity, size and modification time; and the
/// change time, which a hard link moves too (so it is compared from after the placement on).
#[derive(PartialEq, Eq)]
struct Stamp {
    content: (u64, u64, u64, i64, i64),
    changed: (i64, i64),
}

fn stamp(f: &File) -> io::Result<Stamp> {
    let m = f.metadata()?;
    Ok(Stamp { content: (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()), changed: (m.ctime(), m.ctime_nsec()) })
}

impl Store {
    /// Imports the content of `src` as a kept, verified task and announces it. `progress`
    /// hears the bytes hashed so far. Reads every byte once: run it on a blocking thread.
    pub fn import(&self, src: &File, progress: &(dyn Fn(u64) + Sync)) -> Result<Imported, ImportError> {
        let meta = src.metadata()?;
        if !meta.file_type().is_file() {
            return Err(ImportError::NotRegular);
        }
        let before = stamp(src)?;
        let layout = Layout::new(meta.size());
        self.has_room(layout.len)?;
        let path = self.import_path();
        let placed = place(src, &path, &meta);
        let result = placed.and_then(|(placement, dest)| {
            let placed_at = stamp(src)?;
            // A clone cannot change under the hash: hash it. A link is the file itself.
            let (read_from, write_to) = match placement {
                Placement::Reflink => (&dest, None),
                Placement::HardLink => (src, None),
                Placement::Copy => (src, Some(&dest)),
            };
            let (digest, pieces) = hash(read_from, write_to, layout, progress)?;
            let after = stamp(src)?;
            if after.content != before.content || after.changed != placed_at.changed {
                return Err(ImportError::Changed);
            }
            if let Some(out) = write_to {
                out.sync_data()?;
            }
            Ok((placement, digest, pieces))
        });
        match result {
            Ok((placement, digest, pieces)) => {
                let task = self.adopt(&path, &digest, layout, pieces)?;
                Ok(Imported { task, placement })
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }
}

/// Puts `src` at `path`: a reflink, else a hard link, else an empty file the hash pass copies
/// into. A hard link shares the file with its owner, so only a file nobody else can change
/// gets one: the daemon's own user's, writable by no group or other user, and with no other
/// name. The store never writes into a kept task's file (it drops the task instead), so the
/// link never changes the user's file either.
fn place(src: &File, path: &Path, meta: &std::fs::Metadata) -> Result<(Placement, File), ImportError> {
    let create = || OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(path);
    let dest = create()?;
    // SAFETY: FICLONE on two descriptors we own; no memory is involved.
    let cloned = unsafe { libc::ioctl(dest.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0;
    if cloned {
        return Ok((Placement::Reflink, dest));
    }
    // SAFETY: geteuid has no preconditions.
    let own = meta.uid() == unsafe { libc::geteuid() };
    if own && meta.mode() & 0o022 == 0 && meta.nlink() == 1 {
        std::fs::remove_file(path)?;
        let by_fd = PathBuf::from(format!("/proc/self/fd/{}", src.as_raw_fd()));
        if linkat_follow(&by_fd, path).is_ok() {
            return Ok((Placement::HardLink, File::open(path)?));
        }
        return Ok((Placement::Copy, create()?));
    }
    Ok((Placement::Copy, dest))
}

fn linkat_follow(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: both are valid NUL-terminated paths.
    let rc =
        unsafe { libc::linkat(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::AT_SYMLINK_FOLLOW) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Hashes `layout.len` bytes of `src`: the whole content on one thread, each piece (sha256
/// and crc32c) on this one, copying each piece to `copy_to` if given.
fn hash(
    src: &File,
    copy_to: Option<&File>,
    layout: Layout,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(Digest, Vec<PieceRecord>), ImportError> {
    let (tx, rx) = sync_channel::<Arc<Vec<u8>>>(4);
    std::thread::scope(|s| {
        let whole = s.spawn(move || {
            let mut h = Hasher::new(Algorithm::Sha256);
            for piece in rx {
                h.update(&piece);
            }
            h.finish()
        });
        let mut records = Vec::with_capacity(layout.count());
        let mut done = 0;
        for i in 0..layout.count() {
            let r = layout.piece_range(i);
            let mut buf = vec![0; (r.end - r.start) as usize];
            if let Err(e) = src.read_exact_at(&mut buf, r.start) {
                // The file got shorter than it was.
                return Err(if e.kind() == io::ErrorKind::UnexpectedEof { ImportError::Changed } else { e.into() });
            }
            if let Some(out) = copy_to {
                out.write_all_at(&buf, r.start)?;
            }
            records.push(PieceRecord {
                crc32c: crc32c::crc32c(&buf),
                sha256: Some(Digest::of(Algorithm::Sha256, &buf).hex().to_owned()),
            });
            done += buf.len() as u64;
            if tx.send(Arc::new(buf)).is_err() {
                break;
            }
            progress(done);
        }
        drop(tx);
        let digest = whole.join().map_err(|_| io::Error::other("the hashing thread panicked"))?;
        Ok((digest, records))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;
    use std::io::Write;

    fn store(dir: &Path) -> Store {
        let cfg = StoreConfig { dir: dir.to_owned(), quota: 1 << 30, direct_io: false, max_tasks: 100 };
        Store::open(cfg, Arc::new(crate::Metrics::default())).unwrap()
    }

    #[test]
    fn an_imported_file_is_a_kept_verified_task_with_every_piece_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir.path().join("store"));
        let content: Vec<u8> = (0..(9 << 20) + 17).map(|i| (i * 7 % 251) as u8).collect();
        let path = dir.path().join("f");
        std::fs::write(&path, &content).unwrap();
        let imported = store.import(&File::open(&path).unwrap(), &|_| {}).unwrap();
        let digest = Digest::of(Algorithm::Sha256, &content);
        assert_eq!(imported.task.digest(), &digest);
        assert!(imported.task.is_verified());
        let meta = imported.task.meta();
        assert!(meta.kept);
        assert_eq!(meta.pieces.len(), 3);
        assert!(meta.pieces.iter().all(|p| p.as_ref().is_some_and(|r| r.sha256.is_some())));
        let (file, len) = store.open_verified(&digest).unwrap().unwrap();
        assert_eq!(len, content.len() as u64);
        let mut back = vec![0; content.len()];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, content);
        // The same file's owner here is this process: no bytes were copied.
        assert_ne!(imported.placement, Placement::Copy);
    }

    #[test]
    fn a_kept_task_survives_a_restart_and_is_not_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::File::create(&path).unwrap().write_all(&[3; 5000]).unwrap();
        let digest = {
            let store = store(&dir.path().join("store"));
            store.import(&File::open(&path).unwrap(), &|_| {}).unwrap().task.digest().clone()
        };
        let store = store(&dir.path().join("store"));
        let task = store.get(&digest).unwrap().unwrap();
        assert!(task.is_verified() && task.meta().kept);
        drop(task);
        assert!(store.remove(&digest));
        assert!(store.get(&digest).unwrap().is_none());
    }

    #[test]
    fn a_copy_refuses_a_file_that_shrinks_under_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1; 6 << 20]).unwrap();
        let src = File::open(&path).unwrap();
        let out = tempfile::tempfile().unwrap();
        let layout = Layout::new(6 << 20);
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(1 << 20).unwrap();
        assert!(matches!(hash(&src, Some(&out), layout, &|_| {}), Err(ImportError::Changed)));
    }
}
