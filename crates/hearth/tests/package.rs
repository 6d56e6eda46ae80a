//! The Debian package and the systemd unit, installed for real: `scripts/deb.sh` builds the
//! package from this build's binaries, `dpkg -i` installs it (as root; the test removes it
//! again), the installed `hearth` answers `--version` and `config check` with the packaged
//! config as the `hearth` user, `systemd-analyze verify` accepts the unit and `systemd-analyze
//! security` rates its hardening.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::*;

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Removes the package however the test ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = run("dpkg", &["--purge", "hearth"]);
    }
}

#[test]
fn the_deb_installs_and_its_unit_verifies() {
    let scratch = Scratch::new("package");
    let bins = Path::new(env!("CARGO_BIN_EXE_hearth"))
        .parent()
        .expect("bin dir")
        .display()
        .to_string();
    let out_dir = scratch.0.display().to_string();
    let built = Command::new(repo_root().join("scripts/deb.sh"))
        .args(["--bin-dir", &bins, "--out", &out_dir, "--fast"])
        .output()
        .expect("scripts/deb.sh");
    assert!(built.status.success(), "{}", text(&built));
    let deb = String::from_utf8_lossy(&built.stdout).trim().to_string();
    let contents = text(&run("dpkg-deb", &["--contents", &deb]));
    for path in [
        "./usr/bin/hearth",
        "./lib/systemd/system/hearth.service",
        "./etc/hearth/hearth.toml",
        "./usr/share/doc/hearth/copyright",
    ] {
        assert!(contents.contains(path), "{path} missing: {contents}");
    }

    if !hearth_bench::mosquitto::running_as_root() {
        eprintln!("not root: the package is built and listed, not installed");
        return;
    }
    let installed = run("dpkg", &["-i", &deb]);
    let _guard = Installed;
    assert!(installed.status.success(), "dpkg -i: {}", text(&installed));

    let version = run("/usr/bin/hearth", &["--version"]);
    assert!(
        text(&version).contains(env!("CARGO_PKG_VERSION")),
        "{}",
        text(&version)
    );
    assert!(
        run("getent", &["passwd", "hearth"]).status.success(),
        "the package makes its user"
    );
    // The packaged config, read by the service's user: embedded, the data in /var/lib/hearth.
    let check = run(
        "runuser",
        &[
            "-u",
            "hearth",
            "--",
            "/usr/bin/hearth",
            "config",
            "check",
            "--config",
            "/etc/hearth/hearth.toml",
        ],
    );
    assert!(check.status.success(), "config check: {}", text(&check));
    assert!(text(&check).contains("embedded"), "{}", text(&check));

    let unit = "/lib/systemd/system/hearth.service";
    let verify = run("systemd-analyze", &["verify", unit]);
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        text(&verify)
    );
    let security = run("systemd-analyze", &["security", "--offline=yes", unit]);
    let rating = text(&security);
    let exposure: f64 = rating
        .lines()
        .find_map(|l| l.split("Overall exposure level for hearth.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {rating}"));
    assert!(
        exposure <= 2.0,
        "the unit's exposure is {exposure}: {rating}"
    );
}
