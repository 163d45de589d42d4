//! `damselfly cache` as a user runs it: the binary, against the admin socket of a daemon's
//! data directory.

use std::path::Path;

use anyhow::{Context, Result};

use crate::mirror::damselfly_binary;

/// What one run of the command said.
#[derive(Debug)]
pub struct CacheRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CacheRun {
    /// The JSON object a `--json` run printed.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    pub fn ok(self) -> CacheRun {
        assert_eq!(self.code, 0, "damselfly cache failed: {self:?}");
        self
    }
}

/// Runs `damselfly cache ARGS --data-dir DATA_DIR`.
pub async fn cache(data_dir: &Path, args: &[&str]) -> Result<CacheRun> {
    let out = tokio::process::Command::new(damselfly_binary()?)
        .arg("cache")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .kill_on_drop(true)
        .output()
        .await
        .context("running damselfly cache")?;
    Ok(CacheRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
