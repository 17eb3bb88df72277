//! Orchestration only: set-up, the demo, the test suite. No product logic.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install every prerequisite (scripts/setup.sh); quick when all is present.
    Setup,
    /// Run the balancer: `lb run` with the given arguments, or, with none, a
    /// demo in network namespaces (a client, the balancer, three backends).
    /// With --balancers N, the scale-out demo: N balancers behind an ECMP
    /// router, BGP through BIRD, flow sync, one balancer killed.
    Run {
        /// The scale-out demo with this many balancers (2 to 8).
        #[arg(long, conflicts_with = "args", value_parser = clap::value_parser!(u8).range(2..=8))]
        balancers: Option<u8>,
        /// Arguments for `lb run` (for example: --iface eth0 --config /etc/lb/lb.toml).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The whole suite: formatting, lints, unit, datapath and end-to-end tests (as root).
    Test,
    /// The benchmark suite (as root): per-packet cost, forwarded pps against the
    /// floor and nftables, connections against HAProxy, control-plane rebuild
    /// times. Writes target/bench/.
    Bench {
        /// Only one section: costs, throughput, connections, control or fleet.
        section: Option<String>,
    },
    /// An installable tarball in target/dist: the release binary (with the
    /// eBPF object inside), the systemd unit, the example configuration,
    /// shell completions, the man page, the backend sysctl file, the alert
    /// rules and the Grafana dashboard, laid out from / (see
    /// docs/operations.md).
    Dist,
    /// A long hostile-input fuzz run of the datapath (as root).
    Fuzz {
        /// Packets to generate.
        #[arg(long, default_value_t = 20_000_000)]
        packets: u64,
        /// Generator seed (default: from the clock; printed, to replay a failure).
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.command {
        Task::Setup => setup(),
        Task::Run { balancers, args } => {
            setup()?;
            cargo(&["build", "--release", "--workspace"])?;
            match balancers {
                Some(balancers) => fleet_demo(&root, balancers),
                None if args.is_empty() => demo(&root),
                None => run_lb(&root, &args),
            }
        }
        Task::Bench { section } => {
            setup()?;
            cargo(&["build", "--release", "--workspace"])?;
            let status =
                Command::new(root.join("target/release/lb-bench")).args(section).status()?;
            if !status.success() {
                bail!("the bench failed");
            }
            Ok(())
        }
        Task::Dist => {
            cargo(&["build", "--release", "-p", "lb-userspace"])?;
            dist(&root)
        }
        Task::Fuzz { packets, seed } => {
            setup()?;
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_secs())
            });
            println!(
                "fuzzing {packets} packets with seed {seed} (replay: cargo xtask fuzz --packets {packets} --seed {seed})"
            );
            let status = Command::new(cargo_binary())
                .args(["test", "--release", "-p", "tests", "--test", "fuzz", "--", "--nocapture"])
                .env("LB_FUZZ_PACKETS", packets.to_string())
                .env("LB_FUZZ_SEED", seed.to_string())
                .status()?;
            if !status.success() {
                bail!("the fuzz run found failures (seed {seed})");
            }
            Ok(())
        }
        Task::Test => {
            setup()?;
            cargo(&["fmt", "--all", "--check"])?;
            cargo(&["clippy", "--workspace", "--all-targets", "--quiet", "--", "-D", "warnings"])?;
            cargo(&["build", "--workspace"])?;
            let mut child = Command::new(cargo_binary())
                .args(["test", "--workspace", "--no-fail-fast"])
                .stdout(Stdio::piped())
                .spawn()?;
            let mut totals = TestTotals::default();
            let stdout = child.stdout.take().context("test output")?;
            for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
                let line = line?;
                println!("{line}");
                totals.add(&line);
            }
            let status = child.wait()?;
            // One closing line for the whole suite (cargo's last line is a doc-test run).
            println!(
                "tests: {} passed, {} failed, {} skipped",
                totals.passed, totals.failed, totals.ignored
            );
            if !status.success() || totals.failed > 0 {
                bail!("tests failed");
            }
            // A skipped test proves nothing: a green run means every test ran.
            if totals.ignored > 0 {
                bail!(
                    "{} tests were skipped (ignored); the root-only ones need root: run as root",
                    totals.ignored
                );
            }
            if totals.passed == 0 {
                bail!("no test ran");
            }
            Ok(())
        }
    }
}

/// Stages the installation under target/dist/stage (paths as on the
/// target machine) and packs it. Completions and the man page come from the
/// built `lb` itself, so they always match its arguments.
fn dist(root: &Path) -> anyhow::Result<()> {
    let out = root.join("target/dist");
    let stage = out.join("stage");
    let _ = std::fs::remove_dir_all(&stage);
    let lb = root.join("target/release/lb");
    // Where `to` goes in the stage, its directory made.
    let staged = |to: &str| -> anyhow::Result<PathBuf> {
        let target = stage.join(to);
        std::fs::create_dir_all(target.parent().context("a file path")?)?;
        Ok(target)
    };
    let place = |from: &Path, to: &str| -> anyhow::Result<()> {
        std::fs::copy(from, staged(to)?).with_context(|| format!("copying {}", from.display()))?;
        Ok(())
    };
    let generated = |args: &[&str], to: &str| -> anyhow::Result<()> {
        let output = Command::new(&lb).args(args).output()?;
        if !output.status.success() {
            bail!("lb {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
        }
        std::fs::write(staged(to)?, output.stdout)?;
        Ok(())
    };
    let dist = root.join("dist");
    place(&lb, "usr/local/bin/lb")?;
    place(&dist.join("lb.service"), "etc/systemd/system/lb.service")?;
    place(&dist.join("lb-agent.service"), "etc/systemd/system/lb-agent.service")?;
    place(&dist.join("lb.toml"), "etc/lb/lb.toml.example")?;
    place(&dist.join("90-lb-backend.conf"), "usr/local/share/lb/backend/90-lb-backend.conf")?;
    place(&dist.join("prometheus/lb-alerts.yml"), "usr/local/share/lb/prometheus/lb-alerts.yml")?;
    place(&dist.join("grafana/lb-dashboard.json"), "usr/local/share/lb/grafana/lb-dashboard.json")?;
    // lb(1) and a page per subcommand, which lb(1) lists as lb-run(1) and so on.
    let man1 = staged("usr/local/share/man/man1/lb.1")?;
    let man1 = man1.parent().context("a man1 directory")?;
    let status = Command::new(&lb).args(["man", "--dir"]).arg(man1).status()?;
    if !status.success() {
        bail!("lb man --dir {} failed", man1.display());
    }
    generated(&["completions", "bash"], "usr/local/share/bash-completion/completions/lb")?;
    generated(&["completions", "zsh"], "usr/local/share/zsh/site-functions/_lb")?;
    generated(&["completions", "fish"], "usr/local/share/fish/vendor_completions.d/lb.fish")?;
    let version = String::from_utf8(Command::new(&lb).arg("--version").output()?.stdout)?;
    let version = version.split_whitespace().nth(1).context("lb --version")?.to_owned();
    let tarball = out.join(format!("lb-{version}-{}-linux.tar.gz", std::env::consts::ARCH));
    let status = Command::new("tar")
        .arg("-C")
        .arg(&stage)
        .args(["--owner=0", "--group=0", "-czf"])
        .arg(&tarball)
        .arg(".")
        .status()?;
    if !status.success() {
        bail!("tar failed");
    }
    println!("{}", tarball.display());
    println!(
        "install: tar -C / --no-overwrite-dir -xzf {} (see docs/operations.md)",
        tarball.display()
    );
    Ok(())
}

/// Sums cargo's `test result: ok. N passed; N failed; N ignored; ...` lines.
#[derive(Default)]
struct TestTotals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl TestTotals {
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match label {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

fn cargo_binary() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(cargo_binary()).args(args).status()?;
    if !status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}

fn setup() -> anyhow::Result<()> {
    let status = Command::new("bash")
        .arg("scripts/setup.sh")
        .status()
        .context("running scripts/setup.sh")?;
    if !status.success() {
        bail!("scripts/setup.sh failed (see its message above)");
    }
    Ok(())
}

fn run_lb(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let status = Command::new(root.join("target/release/lb")).arg("run").args(args).status()?;
    if !status.success() {
        bail!("lb run exited with {status}");
    }
    Ok(())
}

/// The scale-out demo lives with the fleet testbed it drives (tests/src/demo.rs).
fn fleet_demo(root: &Path, balancers: u8) -> anyhow::Result<()> {
    let status = Command::new(root.join("target/release/lb-testbed"))
        .args(["fleet-demo", &balancers.to_string()])
        .status()?;
    if !status.success() {
        bail!("the scale-out demo failed (see above)");
    }
    Ok(())
}

/// A child killed when dropped, so the demo cleans up on any error.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes the demo's namespaces when dropped.
struct Testbed<'a>(&'a Path);

impl Drop for Testbed<'_> {
    fn drop(&mut self) {
        let _ = Command::new(self.0).args(["down", DEMO_PREFIX]).status();
    }
}

const DEMO_PREFIX: &str = "lbdemo-";
const VIP: &str = "198.18.0.10:80";

fn demo(root: &Path) -> anyhow::Result<()> {
    let bin = root.join("target/release");
    let testbed_bin = bin.join("lb-testbed");
    let lb = bin.join("lb");
    let dir = std::env::temp_dir().join("lb-demo");
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("lb.sock");
    let state = dir.join("state.toml");
    let _ = std::fs::remove_file(&state);

    println!(
        "== Building the demo testbed: namespaces {DEMO_PREFIX}client, {DEMO_PREFIX}lb, {DEMO_PREFIX}b1..b3 on one L2 segment"
    );
    let status = Command::new(&testbed_bin).args(["up", DEMO_PREFIX, "3"]).status()?;
    if !status.success() {
        bail!("building the testbed failed");
    }
    let _testbed = Testbed(&testbed_bin);
    let log = dir.join("lb.log");
    let in_ns = |ns: &str, program: &Path, args: &[&str], stderr: Stdio| -> anyhow::Result<Guard> {
        Ok(Guard(
            Command::new("ip")
                .args(["netns", "exec", &format!("{DEMO_PREFIX}{ns}")])
                .arg(program)
                .args(args)
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()?,
        ))
    };
    let _servers: Vec<Guard> = (1..=3)
        .map(|i| {
            in_ns(
                &format!("b{i}"),
                &testbed_bin,
                &["serve", &format!("b{i}"), "80", "120"],
                Stdio::null(),
            )
        })
        .collect::<Result<_, _>>()?;
    let socket_arg = socket.to_str().context("temp path")?;
    let state_arg = state.to_str().context("temp path")?;
    println!("== Starting lb run --iface eth0 in {DEMO_PREFIX}lb (its log: {})", log.display());
    let _daemon = in_ns(
        "lb",
        &lb,
        &["--socket", socket_arg, "run", "--iface", "eth0", "--state", state_arg],
        std::fs::File::create(&log)?.into(),
    )?;

    let lb_cmd = |args: &[&str]| -> anyhow::Result<String> {
        let output = Command::new(&lb).arg("--socket").arg(&socket).args(args).output()?;
        if !output.status.success() {
            bail!("lb {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while lb_cmd(&["vip", "list"]).is_err() {
        if Instant::now() > deadline {
            bail!("lb run did not start");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for args in [
        vec!["vip", "add", VIP],
        vec!["backend", "add", VIP, "198.18.0.101"],
        vec!["backend", "add", VIP, "198.18.0.102"],
        vec!["backend", "add", VIP, "198.18.0.103"],
    ] {
        println!("$ lb {}\n{}", args.join(" "), lb_cmd(&args)?.trim_end());
    }
    while lb_cmd(&["backend", "list"])?.contains("resolving") {
        if Instant::now() > deadline {
            bail!("backend MACs did not resolve");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let connect = |first_port: &str| -> anyhow::Result<()> {
        let output = Command::new("ip")
            .args(["netns", "exec", &format!("{DEMO_PREFIX}client")])
            .arg(&testbed_bin)
            .args(["client", "tcp", VIP, "198.18.0.1", first_port, "300"])
            .output()?;
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let answer = line.split_once(' ').map_or("?", |(_, answer)| answer);
            let key = if answer.starts_with("ERROR") { "failed" } else { answer };
            *counts.entry(key.to_owned()).or_default() += 1;
        }
        println!("300 TCP connections from the client to {VIP} were answered by: {counts:?}");
        Ok(())
    };
    println!("\n== Traffic");
    connect("40000")?;
    println!("\n$ lb backend list\n{}", lb_cmd(&["backend", "list"])?);
    println!(
        "$ lb lookup {VIP} 198.18.0.1:40000\n{}",
        lb_cmd(&["lookup", VIP, "198.18.0.1:40000"])?
    );
    // The safe removal: drained first, removed once its flows have ended
    // (the last connections closed a moment ago; the count lags a second).
    println!(
        "$ lb backend remove {VIP} 198.18.0.102 --when-drained --timeout 30\n{}",
        lb_cmd(&["backend", "remove", VIP, "198.18.0.102", "--when-drained", "--timeout", "30"])?
    );
    connect("41000")?;
    println!("\n$ lb stats\n{}", lb_cmd(&["stats"])?);
    println!(
        "== Demo done; removing the namespaces. `scripts/testbed.sh up` keeps a testbed up to explore."
    );
    Ok(())
}
