//! `--spawn N`: a throw-away cluster of `msgc-server` processes on
//! 127.0.0.1…127.0.0.N, one free port, one generated config with `peers`,
//! `--node nodeK` each. Also what we can learn about server processes from
//! /proc (peak memory, CPU time).
//!
//! Every child is registered so that Ctrl-C and errors stop it
//! ([`kill_registered`]), and asks the kernel to kill it should this
//! process die without cleaning up (PR_SET_PDEATHSIG).

use anyhow::{bail, Context, Result};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::cli::SetOpt;

/// Pids of every server started, for the Ctrl-C handler.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// Scratch directories of running clusters, likewise.
static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// How long a node may take to accept connections.
const START_LIMIT: Duration = Duration::from_secs(15);
/// How long a node may take to exit after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(4);

/// One spawned node.
pub struct Node {
    pub name: String,
    pub addr: SocketAddr,
    child: Child,
    log: PathBuf,
}

/// A running spawned cluster; stopped on drop.
pub struct Cluster {
    pub nodes: Vec<Node>,
    dir: PathBuf,
}

/// What to start.
pub struct SpawnSpec<'a> {
    pub nodes: usize,
    pub bin: Option<&'a Path>,
    pub shards: Option<usize>,
    pub sets: &'a [SetOpt],
}

impl Cluster {
    /// Starts the nodes and waits until each accepts connections. Must be
    /// called from the main thread (PR_SET_PDEATHSIG follows the thread
    /// that spawned the child).
    ///
    /// # Errors
    /// When the binary is missing, no port is free, or a node exits or
    /// does not listen in time (with the tail of its log).
    pub fn start(spec: &SpawnSpec<'_>) -> Result<Cluster> {
        let bin = server_bin(spec.bin)?;
        let ips: Vec<String> = (1..=spec.nodes).map(|i| format!("127.0.0.{i}")).collect();
        let port = free_port(&ips)?;
        let dir = std::env::temp_dir().join(format!("msgc-loadgen-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let config = dir.join("msgc.conf");
        std::fs::write(&config, config_text(spec, &ips, port))
            .with_context(|| format!("cannot write {}", config.display()))?;
        DIRS.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(dir.clone());
        let mut cluster = Cluster {
            nodes: Vec::new(),
            dir,
        };
        for (i, ip) in ips.iter().enumerate() {
            let name = format!("node{}", i + 1);
            let log = cluster.dir.join(format!("{name}.log"));
            let child = spawn_node(&bin, &config, &name, &log)?;
            register(child.id());
            let addr = SocketAddr::new(ip.parse().context("loopback address")?, port);
            cluster.nodes.push(Node {
                name,
                addr,
                child,
                log,
            });
        }
        for i in 0..cluster.nodes.len() {
            cluster.wait_listening(i)?;
        }
        Ok(cluster)
    }

    /// `HOST:PORT` of every node, in order.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.to_string()).collect()
    }

    /// Pids of the nodes, in order.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.child.id()).collect()
    }

    fn wait_listening(&mut self, i: usize) -> Result<()> {
        let end = Instant::now() + START_LIMIT;
        loop {
            let node = &mut self.nodes[i];
            if let Ok(Some(status)) = node.child.try_wait() {
                bail!(
                    "{} exited at start ({status}): {}",
                    node.name,
                    log_tail(&node.log)
                );
            }
            if TcpStream::connect_timeout(&node.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > end {
                bail!(
                    "{} does not listen on {} after {START_LIMIT:?}: {}",
                    node.name,
                    node.addr,
                    log_tail(&node.log)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A node's log tail, for error messages.
    pub fn describe_failure(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("{}: {}", n.name, log_tail(&n.log)))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// SIGTERM every node, wait (bounded), SIGKILL what is left.
    pub fn stop(&mut self) {
        for n in &self.nodes {
            signal(n.child.id(), libc::SIGTERM);
        }
        let end = Instant::now() + STOP_LIMIT;
        for n in &mut self.nodes {
            while Instant::now() < end {
                if matches!(n.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = n.child.kill();
            let _ = n.child.wait();
            unregister(n.child.id());
        }
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
        DIRS.lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|d| d != &self.dir);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The generated config: one file for every node (`--node` picks).
fn config_text(spec: &SpawnSpec<'_>, ips: &[String], port: u16) -> String {
    let mut s = String::from("# generated by msgc-loadgen --spawn\nmsgc_server {\n");
    s.push_str(&format!("    port = {port}\n"));
    if let Some(n) = spec.shards {
        s.push_str(&format!("    shards = {n}\n"));
    }
    let user = |k: &str| spec.sets.iter().any(|o| o.key == k);
    if ips.len() > 1 {
        s.push_str("    peers = [\n");
        for (i, ip) in ips.iter().enumerate() {
            s.push_str(&format!("        node{} = \"{ip}\"\n", i + 1));
        }
        s.push_str("    ]\n");
        if !user("reconnect_interval") {
            // Nodes start one by one: re-dial quickly so the mesh is up soon.
            s.push_str("    reconnect_interval = 1\n");
        }
    }
    for o in spec.sets {
        s.push_str(&format!("    {} = {}\n", o.key, o.value));
    }
    s.push_str("}\n");
    s
}

fn server_bin(given: Option<&Path>) -> Result<PathBuf> {
    let bin = match given {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .context("cannot find this executable's directory")?
            .with_file_name("msgc-server"),
    };
    if !bin.is_file() {
        bail!(
            "msgc-server not found at {} (build it, or give --server-bin PATH)",
            bin.display()
        );
    }
    Ok(bin)
}

fn spawn_node(bin: &Path, config: &Path, name: &str, log: &Path) -> Result<Child> {
    let err =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(config)
        .arg("--node")
        .arg(name)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err);
    // SAFETY: prctl is async-signal-safe and touches no memory of ours;
    // nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("cannot start {}", bin.display()))
}

/// A port free on every one of `ips` right now (bind and release).
fn free_port(ips: &[String]) -> Result<u16> {
    for _ in 0..200 {
        let first = TcpListener::bind((ips[0].as_str(), 0))
            .with_context(|| format!("cannot bind {}", ips[0]))?;
        let port = first.local_addr()?.port();
        if port == 4809 {
            continue;
        }
        let others: Vec<_> = ips[1..]
            .iter()
            .map(|ip| TcpListener::bind((ip.as_str(), port)))
            .collect();
        if others.iter().all(Result::is_ok) {
            return Ok(port);
        }
    }
    bail!("no port is free on all of {}", ips.join(", "))
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(3)..];
    if tail.is_empty() {
        "(no output)".into()
    } else {
        tail.join(" | ")
    }
}

fn register(pid: u32) {
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner()).push(pid);
}

fn unregister(pid: u32) {
    CHILDREN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|&p| p != pid);
}

fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) on a child we started and have not reaped.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Kills every registered server now and removes the scratch
/// directories (Ctrl-C, when no destructor will run).
pub fn kill_registered() {
    let pids = std::mem::take(&mut *CHILDREN.lock().unwrap_or_else(|p| p.into_inner()));
    for pid in pids {
        signal(pid, libc::SIGKILL);
    }
    let dirs = std::mem::take(&mut *DIRS.lock().unwrap_or_else(|p| p.into_inner()));
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Peak resident memory (VmHWM) of a process, in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// User + system CPU seconds of a process (`"self"` for this one).
pub fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / tick.max(1.0))
}

/// Busy CPU seconds of the whole machine (all CPUs), from /proc/stat.
pub fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = v
        .get(..8)?
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum::<u64>();
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(busy as f64 / tick.max(1.0))
}
