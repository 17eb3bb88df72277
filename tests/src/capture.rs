//! Counting frames where they arrive, with nftables counters on a netdev
//! ingress hook: what a test needs to prove which path a packet took (for
//! example that DSR replies reach the client from a backend, never through
//! the balancer).

use anyhow::Context as _;
use lb_userspace::model::{Mac, format_mac};

use crate::netns::run;

const TABLE: &str = "lbcapture";

/// Counters at one interface of one namespace, for frames from `source`:
/// all of them, and those sent by one MAC.
pub struct SourceCounter {
    ns: String,
}

impl SourceCounter {
    /// Counts frames arriving at `iface` in `ns` from IP `source` (`from_source`),
    /// and among them those whose Ethernet source is `via` (`from_source_via`).
    pub fn install(ns: &str, iface: &str, source: &str, via: Mac) -> anyhow::Result<Self> {
        let family = if source.contains(':') { "ip6" } else { "ip" };
        let via = format_mac(via);
        let ruleset = format!(
            "table netdev {TABLE} {{
                counter from_source {{}}
                counter from_source_via {{}}
                chain ingress {{
                    type filter hook ingress device \"{iface}\" priority 0;
                    {family} saddr {source} counter name from_source
                    {family} saddr {source} ether saddr {via} counter name from_source_via
                }}
            }}"
        );
        load_ruleset(ns, &ruleset)?;
        Ok(Self { ns: ns.to_owned() })
    }

    /// Packets counted so far by the named counter.
    fn packets(&self, counter: &str) -> anyhow::Result<u64> {
        let output = run(
            "ip",
            &["netns", "exec", &self.ns, "nft", "-j", "list", "counter", "netdev", TABLE, counter],
        )?;
        let listing: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        listing["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|item| item["counter"]["packets"].as_u64())
            .with_context(|| format!("no counter {counter} in {listing}"))
    }

    /// Frames from the source address so far.
    pub fn from_source(&self) -> anyhow::Result<u64> {
        self.packets("from_source")
    }

    /// Frames from the source address sent by the `via` MAC so far.
    pub fn from_source_via(&self) -> anyhow::Result<u64> {
        self.packets("from_source_via")
    }
}

impl Drop for SourceCounter {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "exec", &self.ns, "nft", "delete", "table", "netdev", TABLE]);
    }
}

const SOURCES_TABLE: &str = "lbsources";

/// The distinct source addresses within a prefix of the frames arriving
/// at one interface (an nftables set filled from the ingress hook).
pub struct DistinctSources {
    ns: String,
}

impl DistinctSources {
    /// Records the source of every frame arriving at `iface` in `ns` from
    /// within `prefix` (IPv4 or IPv6, `ADDRESS/LEN`).
    pub fn install(ns: &str, iface: &str, prefix: &str) -> anyhow::Result<Self> {
        let (family, kind) =
            if prefix.contains(':') { ("ip6", "ipv6_addr") } else { ("ip", "ipv4_addr") };
        let ruleset = format!(
            "table netdev {SOURCES_TABLE} {{
                set seen {{ type {kind}; flags dynamic; size 65536; }}
                chain ingress {{
                    type filter hook ingress device \"{iface}\" priority 0;
                    {family} saddr {prefix} add @seen {{ {family} saddr }}
                }}
            }}"
        );
        load_ruleset(ns, &ruleset)?;
        Ok(Self { ns: ns.to_owned() })
    }

    /// How many distinct sources arrived so far.
    pub fn count(&self) -> anyhow::Result<usize> {
        let args = [
            "netns",
            "exec",
            &self.ns,
            "nft",
            "-j",
            "list",
            "set",
            "netdev",
            SOURCES_TABLE,
            "seen",
        ];
        let listing: serde_json::Value = serde_json::from_slice(&run("ip", &args)?.stdout)?;
        let set = listing["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|item| item.get("set"))
            .with_context(|| format!("no set in {listing}"))?;
        Ok(set["elem"].as_array().map_or(0, Vec::len))
    }
}

impl Drop for DistinctSources {
    fn drop(&mut self) {
        let args = ["netns", "exec", &self.ns, "nft", "delete", "table", "netdev", SOURCES_TABLE];
        let _ = run("ip", &args);
    }
}

/// Loads an nftables `ruleset` in namespace `ns`.
fn load_ruleset(ns: &str, ruleset: &str) -> anyhow::Result<()> {
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), ruleset)?;
    let path = file.path().to_str().context("temp path")?;
    run("ip", &["netns", "exec", ns, "nft", "-f", path]).map(|_| ())
}
