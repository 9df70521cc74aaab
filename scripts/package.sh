#!/usr/bin/env bash
# Builds the Debian package: the release binary, the man pages and shell completions generated
# from it (`ringlb man`, `ringlb completions`: the real CLI definition), then `cargo deb`.
# Output: target/debian/ringlb_<version>-1_<arch>.deb. Needs cargo-deb
# (`cargo install cargo-deb --locked`) and dpkg-dev (dpkg-shlibdeps, for the dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
out="$target_dir/package"

echo "+ cargo build --release --locked --bin ringlb"
cargo build --release --locked --bin ringlb
bin="$target_dir/release/ringlb"

rm -rf "$out"
mkdir -p "$out/man" "$out/completions"
"$bin" man "$out/man" >/dev/null
gzip -9n "$out"/man/*.1
"$bin" completions bash >"$out/completions/ringlb.bash"
"$bin" completions zsh >"$out/completions/_ringlb"
"$bin" completions fish >"$out/completions/ringlb.fish"

echo "+ cargo deb --no-build"
cargo deb --no-build --locked "$@"
ls -l "$target_dir"/debian/*.deb
