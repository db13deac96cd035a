//! `mailvault-node --config FILE`: runs one node until SIGINT or SIGTERM.

use std::path::PathBuf;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// A mailvault storage node.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Path of the TOML config file.
    #[arg(long, short, env = "MAILVAULT_CONFIG")]
    config: PathBuf,
    /// Check the config and the master key, then exit.
    #[arg(long)]
    check: bool,
}

fn main() -> std::process::ExitCode {
    // One process-wide TLS crypto provider: aws-lc-rs.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = Args::parse();
    // Before anything else: a binary without test modes refuses the variable.
    if let Err(e) = mailvault_node::test_modes::TestModes::from_env() {
        eprintln!("mailvault-node: {e}");
        return std::process::ExitCode::from(2);
    }
    let config = match mailvault_node::config::Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mailvault-node: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.log_json {
        subscriber.json().init();
    } else {
        subscriber.init();
    }
    if args.check {
        return match mailvault_node::crypto::MasterKey::load(&config.master_key_file) {
            Ok(_) => {
                println!("config ok");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mailvault-node: {e}");
                std::process::ExitCode::from(2)
            }
        };
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mailvault-node: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(mailvault_node::server::run(config, shutdown_signal())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailvault-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
