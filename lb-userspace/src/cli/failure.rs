//! Why an `lb` command failed, as its exit status tells scripts: refused,
//! usage, not found, daemon not running (the statuses `lb --help` lists).

use crate::api::ClientError;

/// A failed command, by what a script would do about it.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The daemon or the file said no (or something failed), and why. Exit 1.
    #[error("{0}")]
    Refused(String),
    /// An argument `lb` does not accept. Exit 2, as for clap's own usage errors.
    #[error("{0}")]
    Usage(String),
    /// The VIP or backend named does not exist. Exit 3.
    #[error("{0}")]
    NotFound(String),
    /// Nothing answers on the control socket. Exit 4.
    #[error(transparent)]
    DaemonNotRunning(ClientError),
    /// `lb config diff` found differences, and printed them. Exit 1, as for
    /// diff(1), so that a CI job can detect drift.
    #[error("{0} difference(s) from the running configuration")]
    Differences(usize),
    /// Anything else that went wrong here (I/O, a daemon that stopped
    /// answering). Exit 1.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl Failure {
    pub fn exit_status(&self) -> u8 {
        match self {
            Failure::Refused(_) | Failure::Differences(_) | Failure::Other(_) => 1,
            Failure::Usage(_) => 2,
            Failure::NotFound(_) => 3,
            Failure::DaemonNotRunning(_) => 4,
        }
    }

    /// The name `--json` gives the kind of failure.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Refused(_) => "refused",
            Failure::Usage(_) => "usage",
            Failure::NotFound(_) => "not_found",
            Failure::DaemonNotRunning(_) => "daemon_not_running",
            Failure::Differences(_) => "differences",
            Failure::Other(_) => "failed",
        }
    }

    /// Whether the output already said everything (no error to print).
    pub fn is_said(&self) -> bool {
        matches!(self, Failure::Differences(_))
    }

    /// The failure as `--json` prints it on stdout.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": format!("{self:#}"),
            "kind": self.kind(),
            "exit_status": self.exit_status(),
        })
    }
}

impl From<ClientError> for Failure {
    fn from(error: ClientError) -> Self {
        match error {
            // A socket that is missing or that nobody listens on; a socket
            // we may not open is another matter (exit 1, saying so).
            ClientError::Connect { error: ref io, .. }
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Failure::DaemonNotRunning(error)
            }
            other => Failure::Other(other.into()),
        }
    }
}

impl From<crate::config::ConfigError> for Failure {
    fn from(error: crate::config::ConfigError) -> Self {
        Failure::Refused(error.to_string())
    }
}
