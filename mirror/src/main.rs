//! `damselfly`: the composition root. Parses the command line, sets up logging, and runs the
//! chosen part until SIGINT or SIGTERM.

use anyhow::Context;
use clap::Parser;
use damselfly_mirror::cli::{Cli, Command, SchedulerArgs};
use damselfly_mirror::config::{LogFormat, MirrorConfig};
use damselfly_mirror::daemon::{self, Listeners};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    keep_freed_memory();
    let cli = Cli::parse();
    let runtime =
        || tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime");
    match cli.command {
        Command::Mirror(args) => {
            let config = args.into_config().context("invalid configuration")?;
            init_tracing(config.log_format, &config.log_level);
            runtime()?.block_on(run_mirror(config))
        }
        Command::Scheduler(args) => {
            init_tracing(args.log_format, &args.log_level);
            runtime()?.block_on(run_scheduler(args))
        }
    }
}

/// Streaming churns through buffers of a few hundred KiB (socket reads, staged chunks). By
/// default glibc hands such blocks back to the kernel as soon as they are freed, and the next
/// read faults in fresh zeroed pages: a cold blob cost a fifth more CPU that way. Freed memory is
/// kept for reuse instead, up to a bound.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}

async fn run_mirror(config: MirrorConfig) -> anyhow::Result<()> {
    let listeners = Listeners::bind(&config).await.context("cannot bind the listen addresses")?;
    let running = daemon::start(config, listeners).await.context("cannot start the mirror")?;
    wait_for_signal().await?;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

async fn run_scheduler(args: SchedulerArgs) -> anyhow::Result<()> {
    let config = args.to_config().context("invalid configuration")?;
    let grpc = tokio::net::TcpListener::bind(args.listen).await.context("cannot bind the gRPC address")?;
    let http = tokio::net::TcpListener::bind(args.http_listen).await.context("cannot bind the HTTP address")?;
    let running = damselfly_scheduler::start(config, grpc, Some(http)).await.context("cannot start the scheduler")?;
    tracing::info!(grpc = %running.grpc_addr, http = ?running.http_addr, "damselfly scheduler started");
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

fn init_tracing(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}
