//! The control socket: binding it with the right owner and mode, accepting
//! connections, and passing each request line to the daemon's loop as a
//! [`Call`]. Garbage is answered here and never reaches the daemon.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::api::{Call, Incoming, MAX_REQUEST_BYTES, Reply, encode_line, read_request};

/// Binds the control socket: mode 0600 (root only), or 0660 owned by
/// `group`. Anyone else is refused by the kernel before reaching us. A
/// socket file left by a daemon that died is replaced; one that still
/// answers means another daemon runs.
pub fn bind_socket(path: &Path, group: Option<&str>) -> anyhow::Result<UnixListener> {
    let gid = group.map(group_id).transpose()?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another `lb run` is serving {} (stop it, or pass another --socket)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    // Bound inside a directory only root can enter, given its mode there,
    // then moved into place: it is never reachable with the umask's mode.
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let staging = tempfile::Builder::new()
        .prefix(".lb-socket-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(parent)
        .with_context(|| format!("creating a private directory in {}", parent.display()))?;
    let staged = staging.path().join("sock");
    let listener =
        UnixListener::bind(&staged).with_context(|| format!("binding {}", path.display()))?;
    match gid {
        None => std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?,
        Some(gid) => {
            std::os::unix::fs::chown(&staged, None, Some(gid))?;
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o660))?;
        }
    }
    std::fs::rename(&staged, path)
        .with_context(|| format!("moving the socket to {}", path.display()))?;
    Ok(listener)
}

/// The id of a group, by name (or number).
fn group_id(name: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => anyhow::bail!("--socket-group: no group named '{name}' (see /etc/group)"),
        Err(errno) => anyhow::bail!("--socket-group: looking up group '{name}': {errno}"),
    }
}

/// Control connections served at once; one more is told so and closed.
const MAX_CONNECTIONS: usize = 64;
/// A connection that sends no request for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts control connections until the task is aborted.
pub async fn serve(listener: UnixListener, calls: mpsc::Sender<Call>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => match std::sync::Arc::clone(&slots).try_acquire_owned() {
                Ok(slot) => {
                    let calls = calls.clone();
                    tokio::spawn(async move {
                        connection(stream, calls).await;
                        drop(slot);
                    });
                }
                Err(_) => {
                    let busy = Reply::Error(format!(
                        "the daemon already serves {MAX_CONNECTIONS} control connections: try again"
                    ));
                    let _ = stream.write_all(encode_line(&busy).as_bytes()).await;
                }
            },
            Err(error) => {
                tracing::warn!(%error, "accepting a control connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Answers request lines until the client closes. Garbage gets an error reply
/// and never reaches the daemon's state; an over-long line ends the connection.
async fn connection(stream: UnixStream, calls: mpsc::Sender<Call>) {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    while let Ok(Some(incoming)) =
        tokio::time::timeout(IDLE_TIMEOUT, read_request(&mut reader)).await
    {
        let ends = matches!(incoming, Incoming::TooLong);
        let reply = match incoming {
            Incoming::Request(request) => {
                let (reply_tx, reply_rx) = oneshot::channel();
                if calls.send((request, reply_tx)).await.is_err() {
                    return;
                }
                reply_rx.await.unwrap_or_else(|_| Reply::Error("the daemon is stopping".into()))
            }
            Incoming::Malformed(error) => Reply::Error(format!("malformed request: {error}")),
            Incoming::TooLong => {
                Reply::Error(format!("request longer than {MAX_REQUEST_BYTES} bytes"))
            }
        };
        if writer.write_all(encode_line(&reply).as_bytes()).await.is_err() || ends {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _};

    use super::*;
    use crate::api::{Body, Request};

    /// A control socket in a fresh directory, served by [`serve`], with a
    /// daemon that answers every request "done".
    async fn served() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.sock");
        let listener = bind_socket(&path, None).unwrap();
        let (calls_tx, mut calls_rx) = mpsc::channel::<Call>(64);
        tokio::spawn(serve(listener, calls_tx));
        tokio::spawn(async move {
            while let Some((_, reply)) = calls_rx.recv().await {
                let _ = reply.send(Reply::Ok(Body::Done { message: "done".into(), changed: true }));
            }
        });
        (dir, path)
    }

    /// Sends a request on `stream` and returns the reply line ("" at EOF).
    async fn ask(stream: &mut UnixStream) -> String {
        let _ = stream.write_all(encode_line(&Request::Stats).as_bytes()).await;
        let mut line = String::new();
        let _ = BufReader::new(stream).read_line(&mut line).await;
        line
    }

    #[tokio::test]
    async fn connections_past_the_limit_are_told_so_and_closed() {
        let (_dir, path) = served().await;
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut stream = UnixStream::connect(&path).await.unwrap();
            assert!(
                ask(&mut stream).await.contains("done"),
                "connection {} not served",
                held.len()
            );
            held.push(stream);
        }
        let mut refused = UnixStream::connect(&path).await.unwrap();
        let mut said = String::new();
        refused.read_to_string(&mut said).await.unwrap();
        assert!(said.contains("already serves 64 control connections"), "{said:?}");

        // One closes: a newcomer is served again (once the server has seen the close).
        drop(held.pop());
        let mut served_again = false;
        for _ in 0..100 {
            let mut stream = UnixStream::connect(&path).await.unwrap();
            if ask(&mut stream).await.contains("done") {
                served_again = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(served_again, "a slot freed by a closed connection was never reused");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
        let (_dir, path) = served().await;
        let mut busy = UnixStream::connect(&path).await.unwrap();
        let mut idle = UnixStream::connect(&path).await.unwrap();
        let started = tokio::time::Instant::now();
        for _ in 0..4 {
            assert!(ask(&mut busy).await.contains("done"));
            tokio::time::sleep(IDLE_TIMEOUT / 2).await;
        }
        // The busy connection outlived two idle timeouts; the idle one did not.
        assert!(ask(&mut busy).await.contains("done"));
        assert_eq!(ask(&mut idle).await, "", "the idle connection still answered");
        assert!(started.elapsed() >= 2 * IDLE_TIMEOUT);

        // Closed after the timeout, not before.
        let mut fresh = UnixStream::connect(&path).await.unwrap();
        let opened = tokio::time::Instant::now();
        let mut rest = Vec::new();
        fresh.read_to_end(&mut rest).await.unwrap();
        assert_eq!(
            opened.elapsed().as_secs(),
            IDLE_TIMEOUT.as_secs(),
            "closed after {:?}",
            opened.elapsed()
        );
    }
}
