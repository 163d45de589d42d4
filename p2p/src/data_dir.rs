//! Where a node keeps its data (the store, its identity, the P2P cache's names and socket)
//! when it is not told.

use std::path::PathBuf;

/// Root keeps the cache where packaged daemons keep state; a user runs without privileges in
/// their own XDG data dir.
pub fn default_data_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let is_root = unsafe { libc::geteuid() } == 0;
    data_dir_for(is_root, std::env::var_os("HOME"), std::env::var_os("XDG_DATA_HOME"))
}

fn data_dir_for(is_root: bool, home: Option<std::ffi::OsString>, xdg: Option<std::ffi::OsString>) -> PathBuf {
    let nonempty = |v: Option<std::ffi::OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    let (home, xdg) = (nonempty(home), nonempty(xdg));
    match (is_root, home, xdg) {
        // No HOME usually means a service manager started us: use the system location.
        (true, _, _) | (false, None, _) => PathBuf::from("/var/lib/damselfly"),
        // The XDG spec says relative values are invalid and must be ignored.
        (false, Some(_), Some(x)) if x.is_absolute() => x.join("damselfly"),
        (false, Some(h), _) => h.join(".local/share/damselfly"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_data_dir_rules() {
        let os = |s: &str| Some(std::ffi::OsString::from(s));
        assert_eq!(data_dir_for(true, os("/root"), None), PathBuf::from("/var/lib/damselfly"));
        assert_eq!(data_dir_for(false, None, os("/x")), PathBuf::from("/var/lib/damselfly"));
        assert_eq!(data_dir_for(false, os("/home/u"), None), PathBuf::from("/home/u/.local/share/damselfly"));
        assert_eq!(data_dir_for(false, os("/home/u"), os("/xdg")), PathBuf::from("/xdg/damselfly"));
        assert_eq!(data_dir_for(false, os("/home/u"), os("rel")), PathBuf::from("/home/u/.local/share/damselfly"));
        assert_eq!(data_dir_for(false, os(""), None), PathBuf::from("/var/lib/damselfly"));
    }
}
