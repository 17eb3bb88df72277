//! Connecting to etcd: one member that answers, TLS with the configured CA (and client certificate),
//! etcd's user authentication, keep-alives that notice a dead member, a
//! deadline on every unary call, and errors that name the store and the
//! cause in words an operator can act on.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use super::{Keys, StoreConfig, StoreError};

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one request (a read, a transaction, a lease call) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 pings on idle connections, so a watch on a dead member ends.
const KEEP_ALIVE: Duration = Duration::from_secs(1);
/// The largest answer read at once: a full read of a large fleet.
const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// A connection to one member of the store, with what names the store in
/// messages.
#[derive(Clone)]
pub struct Client {
    pub(super) etcd: etcd_client::Client,
    pub(super) url: String,
    pub(super) keys: Keys,
    /// A client certificate is presented: a connection closed at once is
    /// most likely the member refusing it.
    pub(super) client_certificate: bool,
}

/// Where the next connection starts trying members: connections of one
/// process, and processes, spread over the members.
static NEXT_MEMBER: AtomicUsize = AtomicUsize::new(0);

/// Connects to one member that answers a linearizable read (so it is part
/// of a quorum), trying each in turn. One member rather than a channel
/// balanced over all of them: etcd-client's balanced channel keeps sending
/// a share of the requests to a member that died, and each of those fails;
/// a client of one member fails only when that member does, and whoever
/// holds it connects again, to the next member that answers.
pub async fn connect(config: &StoreConfig) -> Result<Client, StoreError> {
    let url = config.url();
    let options = options(config)?;
    let keys = config.keys();
    let client_certificate = config.cert_file.is_some();
    let members = config.endpoints.len().max(1);
    let first = NEXT_MEMBER.fetch_add(1, Ordering::Relaxed) + std::process::id() as usize;
    let mut failures: Vec<(String, String)> = Vec::new();
    for turn in 0..config.endpoints.len() {
        let endpoint = &config.endpoints[(first + turn) % members];
        match reach(endpoint, options.clone(), &url, &keys, client_certificate).await {
            Ok(client) => return Ok(client),
            Err(StoreError::Unreachable { cause, .. }) => failures.push((endpoint.clone(), cause)),
            Err(refused) => return Err(refused),
        }
    }
    // The hint about refused certificates once, after every member's cause.
    let refused_certificate =
        failures.iter().any(|(_, cause)| cause.ends_with(CLOSED_WITH_CERTIFICATE));
    for (_, cause) in &mut failures {
        if let Some(bare) = cause.strip_suffix(CLOSED_WITH_CERTIFICATE) {
            *cause = bare.to_owned();
        }
    }
    let mut cause = match failures.as_slice() {
        [] => "no member is configured".to_owned(),
        [(_, cause), rest @ ..] if rest.iter().all(|(_, other)| other == cause) => cause.clone(),
        _ => failures
            .iter()
            .map(|(endpoint, cause)| format!("{endpoint}: {cause}"))
            .collect::<Vec<_>>()
            .join("; "),
    };
    if refused_certificate {
        cause.push_str(CLOSED_WITH_CERTIFICATE);
    }
    Err(StoreError::Unreachable { url, cause })
}

/// The options every connection is made with.
fn options(config: &StoreConfig) -> Result<ConnectOptions, StoreError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_keep_alive(KEEP_ALIVE, KEEP_ALIVE * 2)
        .with_keep_alive_while_idle(true)
        // A member cut off from the others' quorum answers with an error
        // rather than stale data.
        .with_require_leader(true)
        .with_auto_token_refresh(true);
    if let Some(ca_file) = &config.ca_file {
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca_file)?));
        if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(tls);
    }
    if let (Some(user), Some(password_file)) = (&config.user, &config.password_file) {
        let password = String::from_utf8_lossy(&read(password_file)?).trim_end().to_owned();
        options = options.with_user(user, password);
    }
    Ok(options)
}

/// A client of the member at `endpoint`, once it has answered.
async fn reach(
    endpoint: &str,
    options: ConnectOptions,
    url: &str,
    keys: &Keys,
    client_certificate: bool,
) -> Result<Client, StoreError> {
    let connecting = etcd_client::Client::connect([endpoint], Some(options));
    let etcd = tokio::time::timeout(CONNECT_TIMEOUT * 2, connecting)
        .await
        .map_err(|_| StoreError::Unreachable {
            url: url.to_owned(),
            cause: format!("no answer within {:?}", CONNECT_TIMEOUT * 2),
        })?
        .map_err(|error| describe(url, &error))?;
    let client = Client { etcd, url: url.to_owned(), keys: keys.clone(), client_certificate };
    client.call(client.kv().get(keys.fleet(), None)).await?;
    Ok(client)
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|error| StoreError::File { path: path.to_owned(), error })
}

impl Client {
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub(super) fn kv(&self) -> etcd_client::KvClient {
        self.etcd.kv_client().max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Runs one request with [`REQUEST_TIMEOUT`]; errors name the store.
    pub(super) async fn call<T>(
        &self,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
            Ok(result) => result.map_err(|error| {
                let mut error = describe(&self.url, &error);
                if let StoreError::Unreachable { cause, .. } = &mut error
                    && self.client_certificate
                    && CLOSED.iter().any(|closed| cause.contains(closed))
                {
                    cause.push_str(CLOSED_WITH_CERTIFICATE);
                }
                error
            }),
            Err(_) => Err(StoreError::Unreachable {
                url: self.url.clone(),
                cause: format!("no answer within {REQUEST_TIMEOUT:?}"),
            }),
        }
    }
}

/// An etcd error as an operator reads it: unreachable (retrying may help)
/// or refused (the store said no), with the cause chain.
pub(super) fn describe(url: &str, error: &etcd_client::Error) -> StoreError {
    use tonic::Code;
    let cause = chain(error);
    let unreachable = match error {
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Unknown
                | Code::Aborted
        ),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    };
    let url = url.to_owned();
    if unreachable {
        StoreError::Unreachable { url, cause }
    } else {
        StoreError::Refused { url, cause }
    }
}

/// The error and its sources, without repeats, joined by ": ".
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(error) = next {
        let (text, source) = match error.downcast_ref::<etcd_client::Error>() {
            // Its own words ("grpc request error: status: ...") say less
            // than the status's message and sources.
            Some(etcd_client::Error::GRpcStatus(status)) => {
                (status.message().to_owned(), std::error::Error::source(status))
            }
            Some(etcd_client::Error::TransportError(transport)) => {
                (transport.to_string(), std::error::Error::source(transport))
            }
            _ => (error.to_string(), error.source()),
        };
        if !text.is_empty() && !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
        next = source;
    }
    let mut cause = parts.join(": ");
    for (found, hint) in HINTS {
        if cause.contains(found) {
            cause.push_str(hint);
        }
    }
    cause
}

/// How a refused client certificate shows: the member closes the
/// connection, and the client sees one of these, depending on timing.
const CLOSED: [&str; 5] =
    ["connection closed", "broken pipe", "connection reset", "fatal alert", "BadCertificate"];
/// A TLS member that refuses a client certificate just closes the
/// connection; the client sees nothing more.
const CLOSED_WITH_CERTIFICATE: &str = " (a member that closes a TLS connection at once has usually refused the client certificate: check that --store-cert and --store-key were signed by the CA the members trust, their --trusted-ca-file)";

/// What etcd's terse answers mean for the operator.
const HINTS: [(&str, &str); 4] = [
    (
        "too many operations in txn request",
        " (etcd's --max-txn-ops, default 128, limits one change's keys: raise it on every member)",
    ),
    (
        "request is too large",
        " (etcd's --max-request-bytes, default 1.5 MiB, limits one change: raise it on every member)",
    ),
    ("certificate", " (check --store-ca, --store-cert and --store-key against the members' TLS)"),
    ("authentication failed", " (check --store-user and --store-password-file)"),
];
