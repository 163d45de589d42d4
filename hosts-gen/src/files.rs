//! Changing a runtime's files so that they can be put back: each write is atomic (a temporary
//! file in the same directory, renamed over the original) and keeps the original's mode; before
//! its first change to a file, the original is saved once under a backup directory (never
//! overwritten later); files made where the user had none are listed there, so that a restore
//! removes them. `--dry-run` shows a unified diff instead.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The list of files made where there was none, inside the backup directory.
const CREATED: &str = "created";

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct FileError {
    pub path: PathBuf,
    pub source: io::Error,
}

fn at(path: &Path) -> impl Fn(io::Error) -> FileError + '_ {
    move |source| FileError { path: path.to_owned(), source }
}

/// One file's content before (`None`: no file) and after a change.
pub struct Change {
    pub path: PathBuf,
    pub before: Option<String>,
    pub after: String,
}

impl Change {
    pub fn is_noop(&self) -> bool {
        self.before.as_deref() == Some(self.after.as_str())
    }

    /// The unified diff of the change, as `diff -u` prints it.
    pub fn diff(&self) -> String {
        let name = self.path.display().to_string();
        let before = self.before.as_deref().unwrap_or("");
        let old = if self.before.is_some() { name.clone() } else { "/dev/null".to_owned() };
        similar::TextDiff::from_lines(before, &self.after).unified_diff().header(&old, &name).to_string()
    }
}

/// Where originals are kept: `root` mirrors the paths under `base`.
pub struct Backup {
    pub base: PathBuf,
    pub root: PathBuf,
}

impl Backup {
    fn saved(&self, path: &Path) -> Option<PathBuf> {
        Some(self.root.join(path.strip_prefix(&self.base).ok()?))
    }

    fn created(&self) -> Result<Vec<PathBuf>, FileError> {
        let list = self.root.join(CREATED);
        match fs::read_to_string(&list) {
            Ok(text) => Ok(text.lines().filter(|l| !l.is_empty()).map(|l| self.base.join(l)).collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(at(&list)(e)),
        }
    }

    /// Saves what is at `path` before the first change (or records that nothing was).
    fn keep(&self, path: &Path, before: Option<&str>) -> Result<(), FileError> {
        let rel = path.strip_prefix(&self.base).map_err(|_| {
            at(path)(io::Error::new(io::ErrorKind::InvalidInput, "outside the directory being changed"))
        })?;
        let saved = self.root.join(rel);
        if saved.exists() || self.created()?.iter().any(|p| p == path) {
            return Ok(());
        }
        match before {
            Some(_) => {
                if let Some(dir) = saved.parent() {
                    fs::create_dir_all(dir).map_err(at(dir))?;
                }
                fs::copy(path, &saved).map_err(at(&saved))?;
            }
            None => {
                fs::create_dir_all(&self.root).map_err(at(&self.root))?;
                let list = self.root.join(CREATED);
                let mut f = fs::OpenOptions::new().create(true).append(true).open(&list).map_err(at(&list))?;
                writeln!(f, "{}", rel.display()).map_err(at(&list))?;
            }
        }
        Ok(())
    }

    /// Puts every original back byte for byte, removes the files made where there were none
    /// (and their directories, when empty), and then the backup itself. Returns what it
    /// restored or removed.
    pub fn restore(&self) -> Result<Vec<PathBuf>, FileError> {
        let mut done = Vec::new();
        for path in self.created()? {
            match fs::remove_file(&path) {
                Ok(()) => done.push(path.clone()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(at(&path)(e)),
            }
            if let Some(dir) = path.parent().filter(|d| *d != self.base) {
                let _ = fs::remove_dir(dir);
            }
        }
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(at(&dir)(e)),
            };
            for entry in entries {
                let saved = entry.map_err(at(&dir))?.path();
                if saved.is_dir() {
                    stack.push(saved);
                    continue;
                }
                if dir == self.root && saved.file_name().is_some_and(|n| n == CREATED) {
                    continue;
                }
                let Ok(rel) = saved.strip_prefix(&self.root) else { continue };
                let original = self.base.join(rel);
                let bytes = fs::read(&saved).map_err(at(&saved))?;
                let mode = fs::metadata(&saved).map_err(at(&saved))?.permissions().mode();
                write_atomic(&original, &bytes, Some(mode))?;
                done.push(original);
            }
        }
        match fs::remove_dir_all(&self.root) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(at(&self.root)(e)),
        }
        Ok(done)
    }
}

/// Applies `change`, saving the original first. A change that changes nothing writes nothing.
pub fn apply(change: &Change, backup: &Backup) -> Result<bool, FileError> {
    if change.is_noop() {
        return Ok(false);
    }
    if backup.saved(&change.path).is_some() {
        backup.keep(&change.path, change.before.as_deref())?;
    }
    let mode = fs::metadata(&change.path).ok().map(|m| m.permissions().mode());
    write_atomic(&change.path, change.after.as_bytes(), mode)?;
    Ok(true)
}

/// Reads `path`, `None` when there is no file.
pub fn read(path: &Path) -> Result<Option<String>, FileError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(at(path)(e)),
    }
}

/// Writes `bytes` to a temporary file beside `path`, with `mode` (or 0644), and renames it over
/// `path`: a reader sees the old file or the new one, never half of one.
fn write_atomic(path: &Path, bytes: &[u8], mode: Option<u32>) -> Result<(), FileError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(at(dir))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.damselfly-tmp"));
    let written = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(fs::Permissions::from_mode(mode.unwrap_or(0o644) & 0o7777))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(at(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Backup) {
        let dir = tempfile::tempdir().expect("dir");
        let backup = Backup { base: dir.path().to_owned(), root: dir.path().join("_backup") };
        (dir, backup)
    }

    #[test]
    fn a_change_keeps_the_original_once_and_restore_puts_it_back_byte_for_byte() {
        let (dir, backup) = setup();
        let path = dir.path().join("r/hosts.toml");
        fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        let original = "# mine\nserver = \"x\"\n";
        fs::write(&path, original).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        let first = Change { path: path.clone(), before: Some(original.into()), after: "changed\n".into() };
        assert!(apply(&first, &backup).expect("applies"));
        assert_eq!(fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o600, "mode kept");
        let second = Change { path: path.clone(), before: Some("changed\n".into()), after: "again\n".into() };
        assert!(apply(&second, &backup).expect("applies"));
        assert_eq!(fs::read_to_string(backup.root.join("r/hosts.toml")).expect("saved"), original, "kept once");
        let made = dir.path().join("new/hosts.toml");
        assert!(apply(&Change { path: made.clone(), before: None, after: "new\n".into() }, &backup).expect("made"));
        backup.restore().expect("restores");
        assert_eq!(fs::read(&path).expect("back"), original.as_bytes());
        assert!(!made.exists() && !dir.path().join("new").exists(), "made files are removed");
        assert!(!backup.root.exists());
    }

    #[test]
    fn a_change_that_changes_nothing_writes_nothing() {
        let (dir, backup) = setup();
        let path = dir.path().join("f");
        fs::write(&path, "same").expect("write");
        assert!(!apply(&Change { path, before: Some("same".into()), after: "same".into() }, &backup).expect("ok"));
        assert!(!backup.root.exists());
    }

    #[test]
    fn a_diff_names_the_file_and_its_lines() {
        let c = Change { path: "/etc/x.toml".into(), before: Some("a\nb\n".into()), after: "a\nc\n".into() };
        let d = c.diff();
        assert!(d.contains("--- /etc/x.toml") && d.contains("-b") && d.contains("+c"), "{d}");
        let new = Change { path: "/etc/y".into(), before: None, after: "z\n".into() };
        assert!(new.diff().contains("--- /dev/null"));
    }
}
