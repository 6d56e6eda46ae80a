//! A private Mosquitto configured by `deploy/mosquitto.conf`, on a port of its own.
//!
//! `hearth bench` and the tests publish bursts that the shared broker's default limits
//! (`max_queued_messages 1000`) would drop; they start one of these instead. The configuration is
//! compiled in, so `hearth bench` works from any directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The project's broker configuration.
pub const CONF: &str = include_str!("../../../deploy/mosquitto.conf");

pub struct Mosquitto {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    /// Start on `port` (0 picks a free one), with its state in `dir`.
    pub fn start(dir: &Path, port: u16) -> std::io::Result<Mosquitto> {
        Mosquitto::start_with(dir, port, &[])
    }

    /// Start with `extra` configuration lines; each replaces the line of `deploy/mosquitto.conf`
    /// that starts with the same word (to add authentication, say).
    pub fn start_with(dir: &Path, port: u16, extra: &[String]) -> std::io::Result<Mosquitto> {
        let port = if port == 0 { free_port()? } else { port };
        std::fs::create_dir_all(dir)?;
        let replaced = |l: &str| {
            let word = l.split_whitespace().next().unwrap_or("");
            extra
                .iter()
                .any(|e| e.split_whitespace().next() == Some(word))
        };
        let conf: String = CONF
            .lines()
            .filter(|l| l.starts_with('#') || !replaced(l))
            .chain(extra.iter().map(String::as_str))
            .map(|l| {
                if l.starts_with("listener ") {
                    format!("listener {port} 127.0.0.1")
                } else if l.starts_with("persistence_location ") {
                    format!("persistence_location {}/", dir.display())
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let path = dir.join("mosquitto.conf");
        std::fs::write(&path, conf)?;
        // Started as root, Mosquitto drops to its own user, which must be able to write its
        // persistence file here, or a restart silently forgets every session.
        if running_as_root() {
            let _ = Command::new("chown")
                .args(["-R", "mosquitto:"])
                .arg(dir)
                .stderr(Stdio::null())
                .status();
        }
        let mut m = Mosquitto {
            port,
            dir: dir.to_path_buf(),
            child: None,
        };
        m.spawn()?;
        Ok(m)
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("mosquitto.log"))?;
        let child = Command::new(binary())
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(10))
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stop with a signal (`TERM` saves its state, `KILL` does not) and reap it.
    pub fn stop(&mut self, signal: &str) {
        if let Some(child) = self.child.take() {
            stop_child(child, signal);
        }
    }

    /// Start again on the same port with the same state directory.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.stop("TERM");
        self.spawn()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Debian installs the broker outside a user's PATH.
pub fn binary() -> &'static str {
    if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    }
}

pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub fn wait_port(port: u16, timeout: Duration) -> std::io::Result<()> {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("nothing listens on 127.0.0.1:{port}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Is this process running as root (effective uid 0)?
pub fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Send `signal` (`TERM`, `KILL`...) to a child process and reap it.
pub fn stop_child(mut child: Child, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}
