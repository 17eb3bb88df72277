//! The fleet store: the only code that talks to etcd. With `--store`, the
//! desired state of every balancer lives under one prefix in etcd; this
//! module turns the keys there into desired states for the daemon, revision
//! by revision (`follow`), turns the daemon's accepted changes into
//! transactions (`write`), settles the fleet-wide settings once (`open`), and
//! registers backends under leases for `lb agent` (`registration`). The key
//! layout is in `keys`; connecting (TLS, authentication, timeouts, error
//! wording) in `client`. It never decides what is valid: the model's rules
//! do, the same for a key in the store as for a change typed at the CLI.

use std::path::PathBuf;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

mod client;
mod follow;
pub mod keys;
mod open;
mod registration;
mod write;

pub use client::{Client, connect};
pub use follow::{Cache, Follow, Followed, Revision, follow};
pub use keys::{FleetSettings, Keys, Refused, WritePlan};
pub use open::{FleetWanted, Opened, open};
pub use registration::{Registration, RegistrationError};
pub use write::{WriteError, Writer};

/// The port etcd serves clients on when an endpoint gives none.
pub const DEFAULT_PORT: u16 = 2379;

/// Where the store is and how to reach it: `--store etcd://HOST:PORT[,...]/PREFIX`
/// and the `--store-*` options, or the config file's `[store]` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `HOST:PORT` of each etcd member (IPv6 in brackets).
    pub endpoints: Vec<String>,
    /// Every key of the fleet lives below it: `/NAME[/NAME...]`.
    pub prefix: String,
    /// The CA that signed the members' certificates: TLS when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key, for members that require one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// etcd's own authentication: a user and a file holding its password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

impl StoreConfig {
    /// Parses `etcd://HOST[:PORT][,HOST[:PORT]...]/PREFIX`; the TLS and
    /// authentication settings start empty.
    pub fn from_url(text: &str) -> Result<Self, String> {
        let example = "etcd://198.18.0.201:2379,198.18.0.202:2379/lb";
        let rest = text.strip_prefix("etcd://").ok_or_else(|| {
            format!("'{text}' is not etcd://HOST:PORT[,HOST:PORT...]/PREFIX (e.g. {example})")
        })?;
        let (hosts, prefix) = rest
            .split_once('/')
            .ok_or_else(|| format!("'{text}' names no prefix: add /PREFIX (e.g. {example})"))?;
        let endpoints = hosts.split(',').map(parse_endpoint).collect::<Result<Vec<_>, _>>()?;
        let config = Self {
            endpoints,
            prefix: format!("/{prefix}"),
            ca_file: None,
            cert_file: None,
            key_file: None,
            user: None,
            password_file: None,
        };
        config.validate()?;
        Ok(config)
    }

    /// Refuses settings that cannot work, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.endpoints.is_empty() {
            return Err("list at least one etcd endpoint".to_owned());
        }
        for endpoint in &self.endpoints {
            parse_endpoint(endpoint)?;
        }
        let segments: Vec<&str> = self.prefix.strip_prefix('/').unwrap_or("").split('/').collect();
        let good = |segment: &&str| {
            !segment.is_empty()
                && segment.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        if !self.prefix.starts_with('/') || !segments.iter().all(good) {
            return Err(format!(
                "prefix '{}' must be /NAME[/NAME...] of letters, digits, '.', '_' and '-' (e.g. /lb)",
                self.prefix
            ));
        }
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) | (None, Some(_)) => {
                return Err("a client certificate needs both cert_file and key_file".to_owned());
            }
            (Some(_), Some(_)) if self.ca_file.is_none() => {
                return Err("a client certificate needs TLS: give ca_file too".to_owned());
            }
            _ => {}
        }
        if self.user.is_some() != self.password_file.is_some() {
            return Err("etcd authentication needs both user and password_file".to_owned());
        }
        Ok(())
    }

    /// How the store is named in messages: `etcd://HOST:PORT,.../PREFIX`.
    pub fn url(&self) -> String {
        format!("etcd://{}{}", self.endpoints.join(","), self.prefix)
    }

    pub fn keys(&self) -> Keys {
        Keys::new(&self.prefix)
    }
}

/// `HOST[:PORT]` (IPv6 as `[ADDRESS][:PORT]`), with the default port added.
fn parse_endpoint(text: &str) -> Result<String, String> {
    let bad = || format!("'{text}' is not an etcd endpoint HOST[:PORT] (IPv6 as [ADDRESS]:PORT)");
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (address, after) = rest.split_once(']').ok_or_else(bad)?;
        address.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
        (format!("[{address}]"), after.strip_prefix(':'))
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (text.to_owned(), None),
        }
    };
    let host_ok = !host.is_empty()
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-[]:".contains(&b));
    if !host_ok {
        return Err(bad());
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(port) => port.parse::<u16>().ok().filter(|port| *port != 0).ok_or_else(bad)?,
    };
    Ok(format!("{host}:{port}"))
}

/// `--store URL` and the `--store-*` options as given on a command line:
/// each replaces the `[store]` setting of the same name.
#[derive(Clone, Debug, Default)]
pub struct StoreOptions {
    pub url: Option<StoreConfig>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

impl StoreOptions {
    /// Whether any TLS or authentication option was given.
    pub fn any_set(&self) -> bool {
        self.ca_file.is_some()
            || self.cert_file.is_some()
            || self.key_file.is_some()
            || self.user.is_some()
            || self.password_file.is_some()
    }

    pub fn apply_to(&self, store: &mut StoreConfig) {
        let replace = |value: &Option<PathBuf>, field: &mut Option<PathBuf>| {
            if value.is_some() {
                field.clone_from(value);
            }
        };
        replace(&self.ca_file, &mut store.ca_file);
        replace(&self.cert_file, &mut store.cert_file);
        replace(&self.key_file, &mut store.key_file);
        replace(&self.password_file, &mut store.password_file);
        if self.user.is_some() {
            store.user.clone_from(&self.user);
        }
    }
}

/// Whether the store answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreState {
    /// Not reached yet since start.
    #[default]
    Connecting,
    /// Answering: revisions are applied as they come.
    Connected,
    /// Not answering: the balancer runs on the last revision it applied.
    Unreachable,
    /// Answering, but its fleet settings differ from this balancer's: no
    /// revision is applied until that is resolved.
    Refused,
}

/// What the follower last saw of the store, for `lb stats` and metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreStatus {
    pub state: StoreState,
    /// The store's latest revision seen (by the watch or a heartbeat).
    pub revision: i64,
    /// Unix time of the last answer from the store.
    pub last_contact: Option<f64>,
    /// Why the store is unreachable or refused, or the last failure.
    pub last_error: Option<String>,
}

impl StoreStatus {
    /// An answer came now.
    pub fn contact(&mut self, revision: i64) {
        self.state = StoreState::Connected;
        self.revision = self.revision.max(revision);
        self.last_contact = Some(unix_now());
        self.last_error = None;
    }
}

pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

/// Why the store could not be used, naming it and the cause.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store at {url} is unreachable: {cause}")]
    Unreachable { url: String, cause: String },
    #[error("the store at {url} refused the request: {cause}")]
    Refused { url: String, cause: String },
    #[error("{path}: {error}")]
    File { path: PathBuf, error: std::io::Error },
    #[error(
        "the fleet settings in the store ({key}) differ from this balancer's: {differences}; every balancer of a fleet must agree: remove these settings from this balancer's configuration and command line (the store's are used), or change the store's for the whole fleet"
    )]
    FleetConflict { key: String, differences: String },
    #[error("the store's fleet settings ({key}) are not readable: {reason}")]
    BadFleet { key: String, reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_parse_or_say_what_is_wrong() {
        let config =
            StoreConfig::from_url("etcd://198.18.0.201:2379,[fd00::1],etcd-3/lb/prod").unwrap();
        assert_eq!(config.endpoints, ["198.18.0.201:2379", "[fd00::1]:2379", "etcd-3:2379"]);
        assert_eq!(config.prefix, "/lb/prod");
        assert_eq!(config.url(), "etcd://198.18.0.201:2379,[fd00::1]:2379,etcd-3:2379/lb/prod");
        let error = |text: &str| StoreConfig::from_url(text).unwrap_err();
        assert!(error("http://198.18.0.201:2379/lb").contains("is not etcd://"));
        assert!(error("etcd://198.18.0.201:2379").contains("names no prefix"));
        assert!(error("etcd://198.18.0.201:2379/").contains("must be /NAME"));
        assert!(error("etcd://198.18.0.201:2379/lb/").contains("must be /NAME"));
        assert!(error("etcd://198.18.0.201:99999/lb").contains("is not an etcd endpoint"));
        assert!(error("etcd://198.18.0.201:2379,,x/lb").contains("'' is not an etcd endpoint"));
        assert!(error("etcd://[fd00::1/lb").contains("is not an etcd endpoint"));
    }

    #[test]
    fn tls_and_authentication_settings_come_in_pairs() {
        let base = StoreConfig::from_url("etcd://198.18.0.201/lb").unwrap();
        let with = |edit: fn(&mut StoreConfig)| {
            let mut config = base.clone();
            edit(&mut config);
            config.validate()
        };
        assert!(
            with(|c| c.cert_file = Some("c".into()))
                .unwrap_err()
                .contains("both cert_file and key_file")
        );
        assert!(
            with(|c| {
                c.cert_file = Some("c".into());
                c.key_file = Some("k".into());
            })
            .unwrap_err()
            .contains("give ca_file too")
        );
        assert!(
            with(|c| c.user = Some("lb".into())).unwrap_err().contains("user and password_file")
        );
        assert_eq!(with(|c| c.ca_file = Some("ca".into())), Ok(()));
    }
}
