//! `damselfly`: the composition root. Parses the command line, sets up logging, and runs the
//! daemon until SIGINT or SIGTERM.

use anyhow::Context;
use clap::Parser;
use damselfly_mirror::cli::{Cli, Command};
use damselfly_mirror::config::{LogFormat, MirrorConfig};
use damselfly_mirror::daemon::{self, Listeners};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let Command::Mirror(args) = cli.command;
    let config = args.into_config().context("invalid configuration")?;
    init_tracing(&config);
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    runtime.block_on(run_mirror(config))
}

async fn run_mirror(config: MirrorConfig) -> anyhow::Result<()> {
    let listeners = Listeners::bind(&config).await.context("cannot bind the listen addresses")?;
    let running = daemon::start(config, listeners).await.context("cannot start the mirror")?;
    wait_for_signal().await?;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot watch SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

fn init_tracing(config: &MirrorConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}
