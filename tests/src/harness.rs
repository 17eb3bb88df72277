//! Driving the real binaries in the testbed: `lb run` in the balancer's
//! namespace, `lb` commands as an operator types them, and the test servers
//! and clients. Every process is killed when its guard drops.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::netns::{LB_IFACE, Testbed};

/// The build's binary directory (`target/<profile>`): test executables run
/// from its `deps/` folder.
fn binary_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe.parent().expect("a directory").to_path_buf();
    if dir.ends_with("deps") { dir.parent().expect("target/<profile>").to_path_buf() } else { dir }
}

fn built_binary(name: &str) -> PathBuf {
    let path = binary_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` first (cargo xtask test does)",
        path.display()
    );
    path
}

/// The testbed helper (tests/src/bin/lb-testbed.rs).
pub fn testbed_binary() -> PathBuf {
    built_binary("lb-testbed")
}

/// The `lb` binary of the same build.
pub fn lb_binary() -> PathBuf {
    built_binary("lb")
}

/// A child process killed on drop.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends `signal` to our child process `pid` (as std's `Child::id` gives it).
pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid fits i32"));
    nix::sys::signal::kill(pid, signal).expect("signalling our own child");
}

/// Starts `program args` inside namespace `ns`.
pub fn spawn_in(
    ns: &str,
    program: &Path,
    args: &[&str],
    log: Option<&Path>,
) -> anyhow::Result<Process> {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", ns]).arg(program).args(args).stdin(Stdio::null());
    match log {
        Some(path) => {
            let file = std::fs::File::create(path)?;
            command.stdout(file.try_clone()?).stderr(file);
        }
        None => {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    Ok(Process(command.spawn().with_context(|| format!("starting {} in {ns}", program.display()))?))
}

/// Test servers on `port` (TCP and UDP) in every backend, answering b1, b2, ...
pub fn start_servers(testbed: &Testbed, port: u16) -> anyhow::Result<Vec<Process>> {
    (1..=testbed.backends).map(|index| start_server(testbed, index, port)).collect()
}

/// The test server of backend `index` (answering `b<index>`), for five minutes at most.
pub fn start_server(testbed: &Testbed, index: usize, port: u16) -> anyhow::Result<Process> {
    spawn_in(
        &testbed.backend(index),
        &testbed_binary(),
        &["serve", &format!("b{index}"), &port.to_string(), "300"],
        None,
    )
}

/// `count` requests from the client namespace, from source ports
/// `first_port..`; returns (port, answer) with answer "ERROR ..." on failure.
pub fn client_requests(
    testbed: &Testbed,
    protocol: &str,
    vip: &str,
    source: &str,
    first_port: u16,
    count: u16,
) -> anyhow::Result<Vec<(u16, String)>> {
    client_requests_in(&testbed.client(), protocol, vip, source, first_port, count)
}

/// [`client_requests`] from namespace `client` (the fleet's client).
pub fn client_requests_in(
    client: &str,
    protocol: &str,
    vip: &str,
    source: &str,
    first_port: u16,
    count: u16,
) -> anyhow::Result<Vec<(u16, String)>> {
    let output = Command::new("ip")
        .args(["netns", "exec", client])
        .arg(testbed_binary())
        .args(["client", protocol, vip, source, &first_port.to_string(), &count.to_string()])
        .output()?;
    if !output.status.success() {
        bail!("client failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8(output.stdout)?
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(port, answer)| (port.parse().expect("client prints ports"), answer.to_owned()))
        .collect())
}

/// How many answers came from each backend name (or "ERROR").
pub fn tally(answers: &[(u16, String)]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (_, answer) in answers {
        let key = if answer.starts_with("ERROR") { "ERROR".to_owned() } else { answer.clone() };
        *counts.entry(key).or_default() += 1;
    }
    counts
}

/// `lb run` in the balancer namespace, with its own socket and state file.
pub struct Daemon {
    pub process: Option<Process>,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    /// This daemon's `--pin-dir`, on the tests' bpffs.
    pub pin_dir: PathBuf,
    /// The temporary directory holding socket, state and log, if they are in one.
    _dir: Option<tempfile::TempDir>,
}

/// A bpffs in the host's mount namespace, visible inside `ip netns exec`
/// (which remounts only /sys), so pins outlive one `lb run`.
pub const TEST_BPFFS: &str = "/run/lb-tests/bpf";

/// [`TEST_BPFFS`], mounted when missing.
pub fn test_bpffs() -> anyhow::Result<PathBuf> {
    let root = PathBuf::from(TEST_BPFFS);
    std::fs::create_dir_all(&root)?;
    if !lb_userspace::datapath::is_bpffs(&root) {
        crate::netns::run("mount", &["-t", "bpf", "bpf", TEST_BPFFS])?;
    }
    Ok(root)
}

/// Removes the pins of every daemon started by [`Daemon::start_named`] in a
/// namespace under `prefix`.
pub fn remove_pins(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(TEST_BPFFS) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            unpin(&entry.path());
        }
    }
}

/// Removes a daemon's `--pin-dir` and what is pinned in it.
fn unpin(pin_dir: &Path) {
    let _ = lb_userspace::datapath::remove_pins(&pin_dir.join(LB_IFACE));
    let _ = std::fs::remove_dir(pin_dir);
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.process = None;
        // Unpin everything, or each test would leave a datapath (and its flow
        // table) in the kernel.
        unpin(&self.pin_dir);
    }
}

/// The active flows of every backend in `lb stats --json`, added up.
pub fn total_active_flows(stats: &serde_json::Value) -> u64 {
    let backends = stats["backends"].as_array().expect("lb stats lists backends");
    backends.iter().map(|b| b["active_flows"].as_u64().expect("a backend's active_flows")).sum()
}

impl Daemon {
    pub fn start(testbed: &Testbed, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_in(&testbed.balancer(), extra)
    }

    /// `lb run` on the balancer interface of namespace `ns`, its files in a
    /// temporary directory.
    pub fn start_in(ns: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        // bpffs refuses names with a dot, which temp dir names start with.
        let unique =
            dir.path().file_name().context("temp dir name")?.to_string_lossy().replace('.', "");
        let mut daemon = Self {
            process: None,
            socket: dir.path().join("lb.sock"),
            state: dir.path().join("state.toml"),
            log: dir.path().join("lb.log"),
            pin_dir: test_bpffs()?.join(unique),
            _dir: Some(dir),
        };
        daemon.restart_in(ns, extra)?;
        Ok(daemon)
    }

    /// `lb run` in namespace `ns` with its files at `files/NS.{sock,state.toml,log}`
    /// and its pins at `TEST_BPFFS/NS`, where an operator (and
    /// [`remove_pins`]) finds them.
    pub fn start_named(ns: &str, files: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let mut daemon = Self {
            process: None,
            socket: files.join(format!("{ns}.sock")),
            state: files.join(format!("{ns}.state.toml")),
            log: files.join(format!("{ns}.log")),
            pin_dir: test_bpffs()?.join(ns),
            _dir: None,
        };
        daemon.restart_in(ns, extra)?;
        Ok(daemon)
    }

    /// Leaves `lb run` running and its pins in place (`lb-testbed down` removes both).
    pub fn detach(mut self) {
        if let Some(process) = self.process.take() {
            std::mem::forget(process);
        }
        std::mem::forget(self);
    }

    /// Starts `lb run` again with the same socket and state file.
    pub fn restart(&mut self, testbed: &Testbed, extra: &[&str]) -> anyhow::Result<()> {
        self.restart_in(&testbed.balancer(), extra)
    }

    /// Starts `lb run` again in namespace `ns` with the same socket and state file.
    pub fn restart_in(&mut self, ns: &str, extra: &[&str]) -> anyhow::Result<()> {
        self.process = None;
        let socket = self.socket.to_str().context("path")?.to_owned();
        let state = self.state.to_str().context("path")?.to_owned();
        let pin_dir = self.pin_dir.to_str().context("path")?.to_owned();
        let mut args = vec![
            "--socket",
            &socket,
            "run",
            "--iface",
            LB_IFACE,
            "--state",
            &state,
            "--xdp-mode",
            "native",
            "--pin-dir",
            &pin_dir,
        ];
        args.extend_from_slice(extra);
        self.process = Some(spawn_in(ns, &lb_binary(), &args, Some(&self.log))?);
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.lb(&["vip", "list"]).is_err() {
            if Instant::now() > deadline {
                bail!("lb run did not come up; its log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `lb --socket SOCKET args...` as an operator would.
    pub fn command(&self, args: &[&str]) -> Output {
        Command::new(lb_binary())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("running lb")
    }

    /// `lb unload` of this daemon's interface and pin directory.
    pub fn unload(&self) -> Output {
        let pin_dir = self.pin_dir.to_str().expect("a UTF-8 temp path");
        self.command(&["unload", "--iface", LB_IFACE, "--pin-dir", pin_dir])
    }

    /// Like [`Self::command`], failing with lb's stderr.
    pub fn lb(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self.command(args);
        if !output.status.success() {
            bail!("lb {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
        }
        Ok(String::from_utf8(output.stdout)?)
    }

    pub fn json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut full = args.to_vec();
        full.push("--json");
        Ok(serde_json::from_str(&self.lb(&full)?)?)
    }

    /// `lb stats`, asked every 200 ms until the backends' active flows add
    /// up to `at_least` or `within` has passed; the last answer. Active flows
    /// are counted about every second off the daemon's loop, so a count lags
    /// connections just opened.
    pub fn stats_once_counted(
        &self,
        at_least: u64,
        within: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let start = Instant::now();
        loop {
            let stats = self.json(&["stats"])?;
            if total_active_flows(&stats) >= at_least || start.elapsed() >= within {
                return Ok(stats);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until every backend of every VIP is up (MAC resolved, checks passing).
    pub fn wait_backends_active(&self) -> anyhow::Result<()> {
        self.wait_backends(|_| "up").map(|_| ())
    }

    /// Waits until each backend's state is what `want(address)` names;
    /// returns how long that took.
    pub fn wait_backends(&self, want: impl Fn(&str) -> &'static str) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            let backends = self.json(&["backend", "list"])?;
            let list = backends.as_array().context("list")?;
            let done = !list.is_empty()
                && list.iter().all(|b| {
                    b["state"].as_str() == Some(want(b["address"].as_str().unwrap_or_default()))
                });
            if done {
                return Ok(start.elapsed());
            }
            if start.elapsed() > Duration::from_secs(15) {
                bail!("backends did not reach the wanted states: {backends}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The backend `lb lookup` names for a client flow.
    pub fn lookup(&self, vip: &str, client: &str, protocol: &str) -> anyhow::Result<String> {
        let answer = self.json(&["lookup", vip, client, "--proto", protocol])?;
        Ok(answer["backend"].as_str().unwrap_or("none").to_owned())
    }
}

/// The `ws-clients` process (tests/src/websocket.rs) in a namespace, driven
/// line by line: each command answers with one JSON line.
pub struct WsClients {
    _process: Process,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl WsClients {
    /// Opens `count` connections to `vip` from namespace `ns`; returns the
    /// clients and what opening reported.
    pub fn start(ns: &str, vip: &str, count: usize) -> (Self, serde_json::Value) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(testbed_binary())
            .args(["ws-clients", vip, &count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("ws-clients");
        let stdin = child.stdin.take().expect("piped");
        let stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let mut clients = Self { _process: Process(child), stdin, stdout };
        let started = clients.read();
        (clients, started)
    }

    /// The answer to the last command sent.
    pub fn read(&mut self) -> serde_json::Value {
        use std::io::BufRead as _;
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("reading ws-clients");
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("ws-clients said: {line:?}"))
    }

    /// Sends a command without waiting for its answer (see [`Self::read`]).
    pub fn send(&mut self, command: &str) {
        use std::io::Write as _;
        writeln!(self.stdin, "{command}").expect("writing to ws-clients");
    }

    pub fn command(&mut self, command: &str) -> serde_json::Value {
        self.send(command);
        self.read()
    }

    /// A message on every connection; asserts none broke or moved.
    pub fn round_without_breaks(&mut self, after: &str) -> serde_json::Value {
        let round = self.command("round");
        println!("FIGURE after {after}: {round}");
        assert_eq!(
            (round["newly_broken"].as_u64(), round["moved"].as_u64()),
            (Some(0), Some(0)),
            "after {after}: {round}"
        );
        round
    }
}

/// Waits up to `seconds` until `done()`; how long that took. Panics naming
/// `what` otherwise.
pub fn wait_until(what: &str, seconds: u64, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(seconds), "{what}: not within {seconds} s");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}
