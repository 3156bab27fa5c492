//! The `strata` command line: argument parsing and the human-facing output
//! of each subcommand. Subcommands call the library; nothing here is needed
//! by the servers.

mod pool;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Strata: layered block volumes for Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "strata", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect and maintain a pool directory (offline).
    #[command(subcommand)]
    Pool(PoolCommand),
}

#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// Verify a pool: catalog against itself and against the files.
    ///
    /// Exits 0 if the pool is clean, 1 if problems were found, 2 if the
    /// pool could not be checked (for example, it is in use).
    Check {
        /// The pool directory (e.g. /var/lib/strata).
        dir: PathBuf,
        /// Remove orphans (files and metadata nothing refers to). Never
        /// touches anything a volume or snapshot uses.
        #[arg(long)]
        repair: bool,
    },
}

/// An error and its causes on one line: "open pool lock /x: No such file".
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

impl Cli {
    /// Runs the command and returns the process exit code.
    pub fn run(self) -> ExitCode {
        match self.command {
            Command::Pool(PoolCommand::Check { dir, repair }) => pool::check(&dir, repair),
        }
    }
}
