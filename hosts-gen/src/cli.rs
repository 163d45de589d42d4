//! `damselfly hosts-gen`: its flags and what each runtime's command does.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::containerd::{self, HostsError};
use crate::cri::{self, CriError};
use crate::docker::{self, DockerError};
use crate::files::{self, Backup, Change, FileError};
use crate::nydusd::Mode;
use crate::registries_conf::{self, ConfError, Entry, MirrorLocation};
use crate::registry::{Registry, RegistryError};

#[derive(Debug, Clone, Args)]
pub struct HostsGenArgs {
    #[command(subcommand)]
    pub runtime: Runtime,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Runtime {
    /// containerd's hosts.toml files (ctr --hosts-dir, and the CRI plugin's config_path).
    Containerd(ContainerdArgs),
    /// dockerd's daemon.json (registry-mirrors; dockerd mirrors Docker Hub only).
    Docker(DockerArgs),
    /// A containers-registries.conf drop-in (skopeo, podman, CRI-O): the daemon as each
    /// registry's first mirror, the registry named in its path.
    RegistriesConf(RegistriesConfArgs),
    /// Print the registry backend of a nydusd configuration (its `device.backend` object).
    Nydusd(NydusdArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RegistriesConfArgs {
    /// The drop-in to write.
    #[arg(long, value_name = "FILE", default_value = "/etc/containers/registries.conf.d/damselfly.conf")]
    pub file: PathBuf,
    /// The main registries.conf: an entry it has for a registry is carried into the drop-in,
    /// which replaces it.
    #[arg(long, value_name = "FILE", default_value = "/etc/containers/registries.conf")]
    pub main_file: PathBuf,
    /// A registry to pull through the daemon: HOST[:PORT] or a URL such as
    /// http://10.0.0.5:5000 (repeatable).
    #[arg(long = "registry", value_name = "R", required_unless_present = "restore")]
    pub registries: Vec<String>,
    /// The daemon's mirror address: HOST:PORT (plain HTTP) or an http(s):// URL.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:65001")]
    pub mirror: String,
    /// The registries themselves may be reached over plain HTTP or unverified TLS (a registry
    /// given as an http:// URL always is).
    #[arg(long)]
    pub insecure: bool,
    /// Print a unified diff of the change, and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Put the file back as it was before the first run (or remove it if there was none).
    #[arg(long, conflicts_with_all = ["registries", "dry_run"])]
    pub restore: bool,
}

#[derive(Debug, Clone, Args)]
pub struct NydusdArgs {
    /// The registry holding the image: HOST[:PORT] or a URL.
    #[arg(long, value_name = "R")]
    pub registry: String,
    /// The image's repository, e.g. library/ubuntu.
    #[arg(long, value_name = "REPO")]
    pub repo: String,
    /// How nydusd reaches the daemon: as a registry mirror, or as its HTTP proxy.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = Mode::Mirror)]
    pub mode: Mode,
    /// The daemon's mirror address (its HTTP proxy address too).
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:65001")]
    pub mirror: String,
    /// The daemon's health endpoint, which nydusd pings while the daemon is failing.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:40901/healthy")]
    pub health: String,
}

#[derive(Debug, Clone, Args)]
pub struct DockerArgs {
    /// dockerd's configuration file.
    #[arg(long, value_name = "FILE", default_value = "/etc/docker/daemon.json")]
    pub daemon_json: PathBuf,
    /// The daemon's mirror address.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:65001")]
    pub mirror: String,
    /// Print a unified diff of the change, and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Put the file back as it was before the first run (or remove it if there was none).
    #[arg(long, conflicts_with = "dry_run")]
    pub restore: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ContainerdArgs {
    /// containerd's hosts directory (the CRI plugin's registry.config_path).
    #[arg(long, value_name = "DIR", default_value = "/etc/containerd/certs.d")]
    pub config_path: PathBuf,
    /// A registry to pull through the daemon: HOST[:PORT] (HTTPS) or a URL such as
    /// http://10.0.0.5:5000 (repeatable).
    #[arg(long = "registry", value_name = "R")]
    pub registries: Vec<String>,
    /// Also every registry without a file of its own (_default/hosts.toml).
    #[arg(long)]
    pub all_registries: bool,
    /// The daemon's mirror address.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:65001")]
    pub mirror: String,
    /// containerd's config (e.g. /etc/containerd/config.toml): make the CRI plugin, which
    /// kubelet pulls through, read --config-path (config version 2 or 3).
    #[arg(long, value_name = "FILE")]
    pub containerd_config: Option<PathBuf>,
    /// How long containerd waits to connect to the daemon before it goes to the registry
    /// (containerd 2.1 and later read it), e.g. 200ms.
    #[arg(long, value_name = "DUR")]
    pub dial_timeout: Option<String>,
    /// Print a unified diff of every file that would change, and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Put back every file as it was before the first run, and remove the ones it made.
    #[arg(long, conflicts_with_all = ["registries", "all_registries", "dry_run"])]
    pub restore: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HostsGenError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Hosts(#[from] HostsError),
    #[error(transparent)]
    Cri(#[from] CriError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Conf(#[from] ConfError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{0}: no such file")]
    Missing(PathBuf),
    #[error("nothing to do: name a registry with --registry, or use --all-registries")]
    Nothing,
    #[error("--mirror {0:?} is not an http(s):// URL")]
    Mirror(String),
    #[error("--mirror {0:?} is neither HOST:PORT nor an http(s):// URL without a path")]
    MirrorLocation(String),
}

/// Runs the command; what it changed (or would change) goes to `out`.
pub fn run(args: &HostsGenArgs, out: &mut dyn std::io::Write) -> Result<(), HostsGenError> {
    match &args.runtime {
        Runtime::Containerd(a) => containerd_cmd(a, out),
        Runtime::Docker(a) => docker_cmd(a, out),
        Runtime::RegistriesConf(a) => registries_conf_cmd(a, out),
        Runtime::Nydusd(a) => {
            let registry = Registry::parse(&a.registry)?;
            let backend = crate::nydusd::backend(&registry, &a.repo, a.mode, &a.mirror, &a.health);
            let text = serde_json::to_string_pretty(&backend).unwrap_or_default();
            let _ = writeln!(out, "{text}");
            Ok(())
        }
    }
}

/// Originals of files outside a hosts directory are kept beside them.
fn backup_beside(file: &std::path::Path) -> Backup {
    let base = file.parent().unwrap_or(std::path::Path::new(".")).to_owned();
    Backup { root: base.join(".damselfly-backup"), base }
}

fn docker_cmd(a: &DockerArgs, out: &mut dyn std::io::Write) -> Result<(), HostsGenError> {
    let backup = backup_beside(&a.daemon_json);
    if a.restore {
        return restore(&[&backup], out);
    }
    check_mirror(&a.mirror)?;
    let before = files::read(&a.daemon_json)?;
    let after = docker::merge(&a.daemon_json, before.as_deref(), &a.mirror)?;
    let change = Change { path: a.daemon_json.clone(), before, after };
    let restart = "restart dockerd (systemctl restart docker) for it to read the mirror";
    write_or_show(&[(change, &backup, Some(restart))], a.dry_run, out)
}

fn registries_conf_cmd(a: &RegistriesConfArgs, out: &mut dyn std::io::Write) -> Result<(), HostsGenError> {
    let backup = backup_beside(&a.file);
    if a.restore {
        return restore(&[&backup], out);
    }
    let mirror = MirrorLocation::parse(&a.mirror).ok_or_else(|| HostsGenError::MirrorLocation(a.mirror.clone()))?;
    let registries: Vec<Registry> = a.registries.iter().map(|r| Registry::parse(r)).collect::<Result<_, _>>()?;
    let entries: Vec<Entry<'_>> = registries
        .iter()
        .map(|registry| Entry { registry, insecure: a.insecure || registry.url.starts_with("http://") })
        .collect();
    let before = files::read(&a.file)?;
    let main = files::read(&a.main_file)?;
    let after = registries_conf::merge(&a.file, before.as_deref(), main.as_deref(), &entries, &mirror)?;
    let change = Change { path: a.file.clone(), before, after };
    write_or_show(&[(change, &backup, None)], a.dry_run, out)?;
    // The daemon reads a registry in the path as containerd's `ns`: over HTTPS, unless it is
    // on loopback or the daemon lists it as insecure.
    for r in registries.iter().filter(|r| r.url.starts_with("http://")) {
        let _ = writeln!(
            out,
            "note: the daemon reaches {} over plain HTTP only if it is on loopback or listed with --insecure-registry {}",
            r.host, r.host
        );
    }
    Ok(())
}

fn containerd_cmd(a: &ContainerdArgs, out: &mut dyn std::io::Write) -> Result<(), HostsGenError> {
    let hosts_backup = Backup { base: a.config_path.clone(), root: a.config_path.join("_backup") };
    let config_backup = a.containerd_config.as_deref().map(backup_beside);
    if a.restore {
        let backups: Vec<&Backup> = std::iter::once(&hosts_backup).chain(config_backup.as_ref()).collect();
        return restore(&backups, out);
    }
    check_mirror(&a.mirror)?;
    let mut targets: Vec<Option<Registry>> =
        a.registries.iter().map(|r| Registry::parse(r).map(Some)).collect::<Result<_, _>>()?;
    if a.all_registries {
        targets.push(None);
    }
    if targets.is_empty() && a.containerd_config.is_none() {
        return Err(HostsGenError::Nothing);
    }
    let mut changes = Vec::new();
    for registry in &targets {
        let path = containerd::hosts_dir(&a.config_path, registry.as_ref()).join("hosts.toml");
        let before = files::read(&path)?;
        let after =
            containerd::merge(&path, before.as_deref(), registry.as_ref(), &a.mirror, a.dial_timeout.as_deref())?;
        changes.push((Change { path, before, after }, &hosts_backup, None));
    }
    if let (Some(file), Some(backup)) = (&a.containerd_config, &config_backup) {
        let before = files::read(file)?.ok_or_else(|| HostsGenError::Missing(file.clone()))?;
        let after = cri::merge(file, &before, &a.config_path.to_string_lossy())?;
        let restart = "restart containerd (systemctl restart containerd) for the CRI plugin to read it";
        changes.push((Change { path: file.clone(), before: Some(before), after }, backup, Some(restart)));
    }
    write_or_show(&changes, a.dry_run, out)
}

fn check_mirror(mirror: &str) -> Result<(), HostsGenError> {
    match mirror.starts_with("http://") || mirror.starts_with("https://") {
        true => Ok(()),
        false => Err(HostsGenError::Mirror(mirror.to_owned())),
    }
}

/// Puts back what each backup holds, saying what it did.
fn restore(backups: &[&Backup], out: &mut dyn std::io::Write) -> Result<(), HostsGenError> {
    for backup in backups {
        for path in backup.restore()? {
            let _ = writeln!(out, "restored {}", path.display());
        }
    }
    Ok(())
}

/// Applies each change (keeping its original in its backup), or with `dry_run` prints its
/// diff; a written change's note (what to restart) is printed after it.
fn write_or_show(
    changes: &[(Change, &Backup, Option<&str>)],
    dry_run: bool,
    out: &mut dyn std::io::Write,
) -> Result<(), HostsGenError> {
    for (change, backup, note) in changes {
        if dry_run {
            if !change.is_noop() {
                let _ = write!(out, "{}", change.diff());
            }
            continue;
        }
        let wrote = files::apply(change, backup)?;
        let _ = writeln!(out, "{} {}", if wrote { "wrote" } else { "unchanged" }, change.path.display());
        if let Some(note) = note.filter(|_| wrote) {
            let _ = writeln!(out, "{note}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &std::path::Path, registries: &[&str]) -> ContainerdArgs {
        ContainerdArgs {
            config_path: dir.join("certs.d"),
            registries: registries.iter().map(|r| r.to_string()).collect(),
            all_registries: false,
            containerd_config: Some(dir.join("config.toml")),
            mirror: "http://127.0.0.1:65001".into(),
            dial_timeout: None,
            dry_run: false,
            restore: false,
        }
    }

    fn run_quietly(a: &ContainerdArgs) -> Result<String, HostsGenError> {
        let mut out = Vec::new();
        containerd_cmd(a, &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        #[test]
        fn generate_then_restore_gives_every_file_back_byte_for_byte(
            comment in "[a-z #]{0,30}",
            skip in proptest::bool::ANY,
            spaces in "[ \t]{0,3}",
            have_hosts in proptest::bool::ANY,
            sandbox in "[a-z]{1,10}",
        ) {
            let dir = tempfile::tempdir().expect("dir");
            let hosts = dir.path().join("certs.d/ghcr.io/hosts.toml");
            let user_hosts = format!("# {comment}\nserver = \"https://ghcr.io\"\n[host.\"https://office\"]\n{spaces}skip_verify = {skip}\n");
            if have_hosts {
                std::fs::create_dir_all(hosts.parent().expect("dir")).expect("mkdir");
                std::fs::write(&hosts, &user_hosts).expect("write");
            }
            let config = dir.path().join("config.toml");
            let user_config = format!("version = 2\n# {comment}\n[plugins.\"io.containerd.grpc.v1.cri\"]\n{spaces}sandbox_image = \"{sandbox}\"\n");
            std::fs::write(&config, &user_config).expect("write");
            let a = args(dir.path(), &["ghcr.io", "docker.io"]);
            run_quietly(&a).expect("generates");
            let once = (std::fs::read(&hosts).expect("hosts"), std::fs::read(&config).expect("config"));
            run_quietly(&a).expect("again");
            proptest::prop_assert_eq!(&(std::fs::read(&hosts).expect("hosts"), std::fs::read(&config).expect("config")), &once);
            run_quietly(&ContainerdArgs { registries: vec![], restore: true, ..a }).expect("restores");
            proptest::prop_assert_eq!(std::fs::read(&config).expect("config"), user_config.into_bytes());
            match have_hosts {
                true => proptest::prop_assert_eq!(std::fs::read(&hosts).expect("hosts"), user_hosts.into_bytes()),
                false => proptest::prop_assert!(!hosts.exists()),
            }
            proptest::prop_assert!(!dir.path().join("certs.d/docker.io").exists());
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        #[test]
        fn a_registries_conf_drop_in_is_generated_once_and_restored_byte_for_byte(
            comment in "[a-z #]{0,30}",
            blocked in proptest::bool::ANY,
            spaces in "[ \t]{0,3}",
            mirrors in proptest::collection::vec("[a-z]{1,8}\\.corp(/[a-z]{1,8})?", 0..3),
            have_file in proptest::bool::ANY,
        ) {
            let dir = tempfile::tempdir().expect("dir");
            let file = dir.path().join("registries.conf.d/damselfly.conf");
            let mut user = format!("# {comment}\n[[registry]]\nprefix = \"ghcr.io\"\n{spaces}blocked = {blocked}\n");
            for m in &mirrors {
                user.push_str(&format!("\n[[registry.mirror]]\nlocation = \"{m}\"\n"));
            }
            if have_file {
                std::fs::create_dir_all(file.parent().expect("dir")).expect("mkdir");
                std::fs::write(&file, &user).expect("write");
            }
            let a = RegistriesConfArgs {
                file: file.clone(),
                main_file: dir.path().join("registries.conf"),
                registries: vec!["ghcr.io".into(), "127.0.0.1:5000".into()],
                mirror: "127.0.0.1:65001".into(),
                insecure: false,
                dry_run: false,
                restore: false,
            };
            registries_conf_cmd(&a, &mut Vec::new()).expect("generates");
            let once = std::fs::read(&file).expect("written");
            registries_conf_cmd(&a, &mut Vec::new()).expect("again");
            proptest::prop_assert_eq!(std::fs::read(&file).expect("written"), once);
            registries_conf_cmd(&RegistriesConfArgs { registries: vec![], restore: true, ..a }, &mut Vec::new()).expect("restores");
            match have_file {
                true => proptest::prop_assert_eq!(std::fs::read(&file).expect("restored"), user.into_bytes()),
                false => proptest::prop_assert!(!file.exists()),
            }
        }
    }

    #[test]
    fn daemon_json_is_merged_and_restored_byte_for_byte() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("daemon.json");
        let user = "{\n    \"log-driver\": \"journald\"\n}\n";
        std::fs::write(&file, user).expect("write");
        let a = DockerArgs {
            daemon_json: file.clone(),
            mirror: "http://127.0.0.1:65001".into(),
            dry_run: false,
            restore: false,
        };
        let mut out = Vec::new();
        docker_cmd(&a, &mut out).expect("merges");
        let merged = std::fs::read_to_string(&file).expect("read");
        assert!(merged.contains("registry-mirrors") && merged.contains("journald"), "{merged}");
        docker_cmd(&a, &mut out).expect("again");
        assert_eq!(std::fs::read_to_string(&file).expect("read"), merged);
        docker_cmd(&DockerArgs { restore: true, ..a }, &mut out).expect("restores");
        assert_eq!(std::fs::read_to_string(&file).expect("read"), user);
    }

    #[test]
    fn a_dry_run_writes_nothing_and_shows_the_diff() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("config.toml"), "version = 3\n").expect("write");
        let out = run_quietly(&ContainerdArgs { dry_run: true, ..args(dir.path(), &["ghcr.io"]) }).expect("dry run");
        assert!(out.contains("+++ ") && out.contains("config_path"), "{out}");
        assert!(!dir.path().join("certs.d").exists());
        assert_eq!(std::fs::read_to_string(dir.path().join("config.toml")).expect("config"), "version = 3\n");
    }
}
