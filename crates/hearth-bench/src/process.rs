//! The process harness the bench and the tests share: hearth's role processes started from the
//! `hearth` binary with a configuration, their logs kept, killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hearth::config::Config;

/// A run's id (`tag` and the pid: keys, databases and sensors of the run carry it) and its
/// scratch folder.
pub(crate) fn workspace(tag: &str) -> anyhow::Result<(String, PathBuf)> {
    let run_id = format!("{tag}{}x{:04x}", std::process::id(), fastrand::u16(..));
    let dir = std::env::temp_dir().join(format!("hearth-bench-{run_id}"));
    std::fs::create_dir_all(&dir)?;
    Ok((run_id, dir))
}

/// The `hearth` program: `HEARTH_BIN` (set by `hearth bench`), else the one beside this one.
pub fn hearth_binary() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("HEARTH_BIN") {
        return Ok(PathBuf::from(bin));
    }
    Ok(std::env::current_exe()?.with_file_name("hearth"))
}

/// One of hearth's role processes, started from the `hearth` binary.
pub struct Role {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Role {
    pub fn spawn(name: &str, args: &[&str], config: &Config, dir: &Path) -> anyhow::Result<Role> {
        Role::spawn_skipping(name, args, config, dir, &[])
    }

    /// `hearth up` with the `skip` keys left unset (the server URLs: embedded mode).
    pub fn spawn_without(
        args: &[&str],
        config: &Config,
        dir: &Path,
        skip: &[&str],
    ) -> anyhow::Result<Role> {
        Role::spawn_skipping("up", args, config, dir, skip)
    }

    pub fn spawn_skipping(
        name: &str,
        args: &[&str],
        config: &Config,
        dir: &Path,
        skip: &[&str],
    ) -> anyhow::Result<Role> {
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new(hearth_binary()?);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("HEARTH_")) {
            cmd.env_remove(k);
        }
        if let toml::Value::Table(table) = toml::Value::try_from(config)? {
            for (key, value) in table {
                if skip.contains(&key.as_str()) {
                    continue;
                }
                let value = match value {
                    toml::Value::String(s) => s,
                    other => other.to_string(),
                };
                cmd.env(format!("HEARTH_{}", key.to_ascii_uppercase()), value);
            }
        }
        let child = cmd
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        Ok(Role {
            name: name.into(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if std::fs::read_to_string(&self.log)
                .unwrap_or_default()
                .contains(needle)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{} did not log {needle:?} within {timeout:?}; see {}",
                    self.name,
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Remove every Redis key under `prefix` (a run's or a test's), best effort.
pub async fn drop_keys(redis_url: &str, prefix: &str) {
    let Ok(mut conn) =
        hearth::servers::queue::connect(redis_url, hearth::servers::queue::REPLY_TIMEOUT).await
    else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    for chunk in keys.chunks(500) {
        let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
    }
}
