//! A real Prometheus server in a test namespace, scraping a real `lb run`
//! and evaluating the shipped alert rules: what a production scrape sees;
//! and a single scrape of `lb run`'s /metrics, read line by line.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::harness::{Process, spawn_in, testbed_binary};

/// The /metrics of the `lb run` in namespace `ns`, at its default address.
pub fn scrape(ns: &str) -> anyhow::Result<String> {
    let output = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(testbed_binary())
        .args(["http-get", "127.0.0.1:9464", "/metrics"])
        .output()?;
    if !output.status.success() {
        bail!("scraping lb run in {ns}: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// The value of the first sample of `metrics` whose line starts with
/// `line_start` (a name, or a name and the start of its labels).
pub fn sample(metrics: &str, line_start: &str) -> f64 {
    metrics
        .lines()
        .find(|line| line.starts_with(line_start))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in:\n{metrics}"))
}

/// Where the server listens inside its namespace.
const LISTEN: &str = "127.0.0.1:9090";

pub struct Prometheus {
    _process: Process,
    ns: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts `prometheus` in `ns`, scraping `target` (ADDR:PORT) every
    /// second and evaluating `rules` every second.
    pub fn start(ns: &str, target: &str, rules: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [\"{}\"]\nscrape_configs:\n  - job_name: lb\n    static_configs:\n      - targets: [\"{target}\"]\n",
                rules.canonicalize()?.display()
            ),
        )?;
        let log = dir.path().join("prometheus.log");
        let args = [
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            &format!("--web.listen-address={LISTEN}"),
        ];
        let args: Vec<&str> = args.iter().map(|arg| arg.as_str()).collect();
        let process = spawn_in(ns, Path::new("prometheus"), &args, Some(&log))
            .context("prometheus (Debian package prometheus)")?;
        let server = Self { _process: process, ns: ns.to_owned(), _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while server.api("/-/ready", &[]).is_err() {
            if Instant::now() > deadline {
                bail!("prometheus did not start: {}", std::fs::read_to_string(log)?);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(server)
    }

    /// GET `path` with URL-encoded `query` pairs; the body as JSON (or the
    /// text wrapped in a JSON string).
    pub fn api(&self, path: &str, query: &[(&str, &str)]) -> anyhow::Result<serde_json::Value> {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns, "curl", "-sf", "-G"]);
        for (key, value) in query {
            command.arg("--data-urlencode").arg(format!("{key}={value}"));
        }
        let output = command.arg(format!("http://{LISTEN}{path}")).output().context("curl")?;
        if !output.status.success() {
            bail!("GET {path}: curl exited with {}", output.status);
        }
        let body = String::from_utf8(output.stdout)?;
        Ok(serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)))
    }

    /// Waits for a scrape of the one target; its health (`up` when the
    /// exposition parsed) and last error.
    pub fn scraped(&self) -> anyhow::Result<(String, String)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let targets = self.api("/api/v1/targets", &[])?;
            let target = &targets["data"]["activeTargets"][0];
            let health = target["health"].as_str().unwrap_or_default().to_owned();
            if health != "unknown" && !health.is_empty() {
                return Ok((health, target["lastError"].as_str().unwrap_or_default().to_owned()));
            }
            if Instant::now() > deadline {
                bail!("no scrape in 20 s: {targets}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// An instant query's result vector.
    pub fn query(&self, expression: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let answer = self.api("/api/v1/query", &[("query", expression)])?;
        if answer["status"] != "success" {
            bail!("{expression}: {answer}");
        }
        Ok(answer["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}
