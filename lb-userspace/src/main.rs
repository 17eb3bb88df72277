//! `lb`: the load balancer's daemon (`lb run`) and its command-line client.

use std::process::ExitCode;

use clap::Parser as _;
use lb_userspace::cli::{
    self,
    args::{Cli, Command, LogFormat},
};

/// A command whose reader went away (`lb flows | head -1`) ends as other
/// Unix tools do, by SIGPIPE, instead of panicking in `println!`. The two
/// long-running commands keep Rust's default (ignored, so a closed socket
/// is an error to handle, not the end of the daemon).
fn end_quietly_on_closed_pipe(command: &Command) {
    if matches!(command, Command::Run(_) | Command::Agent(_)) {
        return;
    }
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: called before any other thread exists; the default action
    // installs no handler that could run concurrently with this code.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    end_quietly_on_closed_pipe(&cli.command);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        // One JSON object per line, fields flattened, for log shippers.
        LogFormat::Json => logs.json().flatten_event(true).init(),
        // Colour only for a person at a terminal, never into log files.
        LogFormat::Text => {
            logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init()
        }
    }
    let json = cli.json;
    match cli::execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) if failure.is_said() => ExitCode::from(failure.exit_status()),
        Err(failure) => {
            eprintln!("lb: error: {failure:#}");
            if json {
                println!("{}", failure.to_json());
            }
            ExitCode::from(failure.exit_status())
        }
    }
}
