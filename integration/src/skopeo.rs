//! skopeo 1.9 pulling through a `registries.conf` mirror.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Writes `conf_dir/registries.conf` making `mirror_location` (e.g. `127.0.0.1:PORT`, optionally
/// with a path prefix) an insecure mirror of `registry_host`, then runs
/// `skopeo --registries-conf FILE copy docker://SRC_REF dir:DEST_DIR`.
///
/// skopeo 1.9.3 ignores `CONTAINERS_REGISTRIES_CONF`; the hidden global `--registries-conf` flag
/// is the way to point it at a private file. skopeo sends mirrors no `ns`, so the daemon must
/// know the upstream from its own `registry_mirror` setting (or the location's path prefix).
pub async fn skopeo_copy_via_mirror(
    conf_dir: &Path,
    registry_host: &str,
    mirror_location: &str,
    src_ref: &str,
    dest_dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(conf_dir)?;
    let conf = conf_dir.join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "unqualified-search-registries = []\n\n\
             [[registry]]\nprefix = \"{registry_host}\"\nlocation = \"{registry_host}\"\ninsecure = true\n\n\
             [[registry.mirror]]\nlocation = \"{mirror_location}\"\ninsecure = true\n"
        ),
    )?;
    let src = if src_ref.starts_with("docker://") { src_ref.to_owned() } else { format!("docker://{src_ref}") };
    skopeo(&["--registries-conf", &conf.to_string_lossy(), "copy", &src, &format!("dir:{}", dest_dir.display())]).await
}

/// Runs skopeo with `args`; `Err` carries its stderr.
pub async fn skopeo(args: &[&str]) -> Result<()> {
    let mut cmd = tokio::process::Command::new("skopeo");
    cmd.args(args).kill_on_drop(true);
    for var in ["http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"] {
        cmd.env_remove(var);
    }
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .with_context(|| format!("skopeo {args:?} timed out"))?
        .context("running skopeo")?;
    if !out.status.success() {
        bail!("skopeo {args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
