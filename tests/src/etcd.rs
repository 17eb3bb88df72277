//! A real etcd cluster, as the store tests, the fleet testbed, the demo
//! and the bench use it: Debian's etcd, one member per namespace of its own
//! on a testbed's switch (member i at 198.18.0.(200+i)), optionally serving
//! TLS with client certificates required, made here by rcgen (a CA, one
//! server certificate for every member's address, a client certificate, and
//! a stranger's from another CA). Killed and removed with the testbed's
//! namespaces; its files live in the testbed's directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::fleet::{ANNOUNCE_TABLE, Fleet};
use crate::harness::{Daemon, Process, spawn_in};
use crate::netns::{self, join_switch};

/// Where etcd serves clients.
pub const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;

pub fn member_address(index: usize) -> String {
    format!("198.18.0.{}", 200 + index)
}

/// The cluster; every member is killed when it drops (the namespaces go
/// with the testbed).
pub struct Etcd {
    prefix: String,
    members: Vec<Option<Process>>,
    /// Data directories, logs and certificates.
    pub dir: PathBuf,
    pub tls: Option<Tls>,
}

/// The certificates of a TLS cluster.
pub struct Tls {
    pub ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    /// Signed by the cluster's CA: accepted.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Signed by another CA: refused.
    pub stranger_cert: PathBuf,
    pub stranger_key: PathBuf,
}

impl Etcd {
    /// Starts `members` members on `switch` (a namespace with bridge `br0`),
    /// their namespaces named `PREFIXetcdI`, and waits until they serve.
    pub fn up(
        prefix: &str,
        switch: &str,
        files: &Path,
        members: usize,
        tls: bool,
    ) -> anyhow::Result<Self> {
        for index in 1..=members {
            let ns = format!("{prefix}etcd{index}");
            netns::add(&ns)?;
            let address = format!("{}/24", member_address(index));
            join_switch(switch, &ns, &format!("etcd{index}"), &[address])?;
        }
        let dir = files.join("etcd");
        std::fs::create_dir_all(&dir)?;
        let tls = if tls { Some(Tls::make(&dir, members)?) } else { None };
        let mut etcd = Self {
            prefix: prefix.to_owned(),
            members: (0..members).map(|_| None).collect(),
            dir,
            tls,
        };
        for index in 1..=members {
            etcd.start(index)?;
        }
        etcd.wait_healthy()?;
        Ok(etcd)
    }

    pub fn namespace(&self, index: usize) -> String {
        format!("{}etcd{index}", self.prefix)
    }

    /// Starts member `index` (again: it rejoins with its data directory).
    pub fn start(&mut self, index: usize) -> anyhow::Result<()> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let address = member_address(index);
        let cluster: Vec<String> = (1..=self.members.len())
            .map(|i| format!("e{i}=http://{}:{PEER_PORT}", member_address(i)))
            .collect();
        let client_url = format!("{scheme}://{address}:{CLIENT_PORT}");
        let peer_url = format!("http://{address}:{PEER_PORT}");
        let data = self.dir.join(format!("e{index}"));
        let mut args: Vec<String> = [
            "--name",
            &format!("e{index}"),
            "--data-dir",
            data.to_str().context("UTF-8 path")?,
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &cluster.join(","),
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            &self.prefix,
            // A large fleet's `lb config apply` is one transaction.
            "--max-txn-ops",
            "20000",
            "--max-request-bytes",
            "33554432",
        ]
        .map(str::to_owned)
        .to_vec();
        if let Some(tls) = &self.tls {
            for (flag, path) in [
                ("--cert-file", &tls.server_cert),
                ("--key-file", &tls.server_key),
                ("--trusted-ca-file", &tls.ca),
            ] {
                args.extend([flag.to_owned(), path.display().to_string()]);
            }
            args.push("--client-cert-auth".to_owned());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self.dir.join(format!("e{index}.log"));
        let process = spawn_in(&self.namespace(index), Path::new("etcd"), &args, Some(&log))?;
        self.members[index - 1] = Some(process);
        Ok(())
    }

    /// Kills member `index` at once (SIGKILL), as a dead machine.
    pub fn kill(&mut self, index: usize) {
        self.members[index - 1] = None;
    }

    pub fn kill_all(&mut self) {
        for member in &mut self.members {
            *member = None;
        }
    }

    pub fn start_all(&mut self) -> anyhow::Result<()> {
        for index in 1..=self.members.len() {
            if self.members[index - 1].is_none() {
                self.start(index)?;
            }
        }
        self.wait_healthy()
    }

    /// Leaves the members running (`lb-testbed down` kills them with the namespaces).
    pub fn detach(mut self) {
        for member in self.members.drain(..).flatten() {
            std::mem::forget(member);
        }
    }

    /// `HOST:PORT,...` of every member.
    pub fn endpoints(&self) -> String {
        (1..=self.members.len())
            .map(|index| format!("{}:{CLIENT_PORT}", member_address(index)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `lb run`'s (and `lb agent`'s) options for this cluster under `prefix`
    /// (a name, without the leading slash), with the accepted client
    /// certificate when TLS is on.
    pub fn store_args(&self, prefix: &str) -> Vec<String> {
        let mut args = vec!["--store".to_owned(), format!("etcd://{}/{prefix}", self.endpoints())];
        if let Some(tls) = &self.tls {
            for (flag, path) in [
                ("--store-ca", &tls.ca),
                ("--store-cert", &tls.client_cert),
                ("--store-key", &tls.client_key),
            ] {
                args.extend([flag.to_owned(), path.display().to_string()]);
            }
        }
        args
    }

    /// `etcdctl args...` from a running member's namespace; its stdout.
    pub fn etcdctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let index = (1..=self.members.len())
            .find(|index| self.members[index - 1].is_some())
            .context("no etcd member runs")?;
        let mut command = vec!["netns".to_owned(), "exec".to_owned(), self.namespace(index)];
        command.extend(["etcdctl".to_owned(), format!("--endpoints={}", self.running_endpoints())]);
        if let Some(tls) = &self.tls {
            command.extend([
                format!("--cacert={}", tls.ca.display()),
                format!("--cert={}", tls.client_cert.display()),
                format!("--key={}", tls.client_key.display()),
            ]);
        }
        command.extend(args.iter().map(|arg| (*arg).to_owned()));
        let command: Vec<&str> = command.iter().map(String::as_str).collect();
        let output = netns::run("ip", &command)?;
        Ok(String::from_utf8(output.stdout)?)
    }

    fn running_endpoints(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        (1..=self.members.len())
            .filter(|index| self.members[index - 1].is_some())
            .map(|index| format!("{scheme}://{}:{CLIENT_PORT}", member_address(index)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every running member says it is healthy.
    pub fn wait_healthy(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.etcdctl(&["endpoint", "health"]) {
                Ok(_) => return Ok(()),
                Err(error) if Instant::now() > deadline => {
                    let log = std::fs::read_to_string(self.dir.join("e1.log")).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(20).collect();
                    bail!(
                        "etcd did not become healthy: {error:#}; e1.log ends:\n{}",
                        tail.join("\n")
                    );
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// The store's current revision.
    pub fn revision(&self) -> anyhow::Result<i64> {
        let status = self.etcdctl(&["endpoint", "status", "--write-out=json"])?;
        let members: serde_json::Value = serde_json::from_str(&status)?;
        members[0]["Status"]["header"]["revision"].as_i64().context("a revision")
    }
}

impl Tls {
    /// A CA, a server certificate for every member, a client certificate,
    /// and a stranger's (key and certificate from another CA), in `dir`.
    fn make(dir: &Path, members: usize) -> anyhow::Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let write = |name: &str, text: String| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, text)?;
            Ok(path)
        };
        let authority = |name: &str| -> anyhow::Result<(String, Issuer<'static, KeyPair>)> {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(rcgen::DnType::CommonName, name);
            let key = KeyPair::generate()?;
            let cert = params.self_signed(&key)?;
            Ok((cert.pem(), Issuer::new(params, key)))
        };
        let signed = |names: Vec<String>,
                      issuer: &Issuer<'_, KeyPair>|
         -> anyhow::Result<(String, String)> {
            let params = CertificateParams::new(names)?;
            let key = KeyPair::generate()?;
            Ok((params.signed_by(&key, issuer)?.pem(), key.serialize_pem()))
        };
        let (ca_pem, ca) = authority("lb tests CA")?;
        let (_, other_ca) = authority("another CA")?;
        let mut names: Vec<String> = (1..=members).map(member_address).collect();
        names.push("localhost".to_owned());
        let (server_cert, server_key) = signed(names, &ca)?;
        let (client_cert, client_key) = signed(vec!["lb".to_owned()], &ca)?;
        let (stranger_cert, stranger_key) = signed(vec!["lb".to_owned()], &other_ca)?;
        Ok(Self {
            ca: write("ca.pem", ca_pem)?,
            server_cert: write("server.pem", server_cert)?,
            server_key: write("server.key", server_key)?,
            client_cert: write("client.pem", client_cert)?,
            client_key: write("client.key", client_key)?,
            stranger_cert: write("stranger.pem", stranger_cert)?,
            stranger_key: write("stranger.key", stranger_key)?,
        })
    }
}

/// The fleet testbed with a store: its cluster, and balancers that follow it.
impl Fleet {
    /// An etcd cluster of `members` on the fleet's switch (see [`Etcd`]).
    pub fn etcd(&self, members: usize, tls: bool) -> anyhow::Result<Etcd> {
        Etcd::up(&self.prefix, &self.switch(), &self.files, members, tls)
    }

    /// The `lb run` arguments of balancer `index` in a fleet kept in the
    /// store `/lb` of `etcd`: no hash seed (the store's), sync with every
    /// other balancer, announce, then `extra`.
    pub fn store_lb_args(&self, index: usize, etcd: &Etcd, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["--announce-table".to_owned(), ANNOUNCE_TABLE.to_owned()];
        args.extend(self.sync_args(index));
        args.extend(etcd.store_args("lb"));
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        args
    }

    /// Starts `lb run` on balancer `index` with [`Fleet::store_lb_args`].
    pub fn start_lb_with_store(
        &self,
        index: usize,
        etcd: &Etcd,
        extra: &[&str],
    ) -> anyhow::Result<Daemon> {
        let args = self.store_lb_args(index, etcd, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start_named(&self.balancer(index), &self.files, &args)
    }
}
