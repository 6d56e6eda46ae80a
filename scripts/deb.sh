#!/usr/bin/env bash
# Build hearth's Debian package with dpkg-deb (no other tool): /usr/bin/hearth and hearth-bench,
# the systemd unit, /etc/hearth/hearth.toml (a conffile), the rules and docs.
#
#   scripts/deb.sh                      # release build, target/debian/hearth_VERSION-1_ARCH.deb
#   scripts/deb.sh --bin-dir DIR --out DIR --fast
#                                       # binaries already built in DIR; no compression (tests)
#
# Install: dpkg -i hearth_*.deb; then `systemctl enable --now hearth` (not started on install).
set -euo pipefail
cd "$(dirname "$0")/.."

bin_dir="" out="target/debian" compress=(-Zxz)
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --fast) compress=(-Znone); shift ;;
    *) echo "deb.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$bin_dir" ]; then
  cargo build --release --locked --bins
  bin_dir=target/release
fi

version=$(sed -n 's/^version = "\(.*\)"/\1/p' crates/hearth/Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root="$stage/hearth_${version}-1_${arch}"

install -d "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" "$root/etc/hearth" \
  "$root/usr/share/doc/hearth"
for bin in hearth hearth-bench; do
  if [ -x "$bin_dir/$bin" ]; then
    # Without debug information: the package is what runs, not what is debugged.
    objcopy --strip-debug "$bin_dir/$bin" "$root/usr/bin/$bin"
    chmod 0755 "$root/usr/bin/$bin"
  fi
done
[ -x "$root/usr/bin/hearth" ] || { echo "deb.sh: no hearth binary in $bin_dir" >&2; exit 1; }
install -m 0644 deploy/hearth.service "$root/lib/systemd/system/hearth.service"
install -m 0644 deploy/debian/hearth.toml "$root/etc/hearth/hearth.toml"
install -m 0644 deploy/rules.toml README.md "$root/usr/share/doc/hearth/"
install -m 0644 LICENSE "$root/usr/share/doc/hearth/copyright"
install -m 0755 deploy/debian/postinst deploy/debian/postrm "$root/DEBIAN/"
echo /etc/hearth/hearth.toml > "$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: hearth
Version: ${version}-1
Architecture: ${arch}
Maintainer: hearth developers <hearth@localhost>
Installed-Size: ${size}
Depends: libc6, libgcc-s1, passwd
Recommends: ca-certificates
Section: net
Priority: optional
Homepage: https://github.com/hearth-home/hearth
Description: event backbone for connected homes
 hearth takes sensor readings over MQTT, buffers them durably (Redis Streams or its
 embedded store), stores them once each in PostgreSQL or SQLite, raises alerts and pushes
 them over WebSocket and webhooks. With no servers configured it runs embedded: one
 process, its own broker and store.
CONTROL
mkdir -p "$out"
dpkg-deb --root-owner-group "${compress[@]}" --build "$root" "$out/" >/dev/null
echo "$out/hearth_${version}-1_${arch}.deb"
