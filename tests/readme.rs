//! README.md stays true where a test can tell: its configuration reference names every field
//! that `config/ringlb.toml` (the commented reference config) sets or shows commented out, the
//! Quick start's config passes `ringlb check`, and the test command CI runs is there.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::*;

fn read(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The part of the README from heading `from` to the next heading of the same level.
fn section<'a>(readme: &'a str, from: &str) -> &'a str {
    let i = readme
        .find(&format!("\n{from}\n"))
        .unwrap_or_else(|| panic!("README has no {from:?}"));
    let level = from.split(' ').next().expect("#s");
    let rest = &readme[i + from.len() + 2..];
    let end = rest.find(&format!("\n{level} ")).unwrap_or(rest.len());
    &rest[..end]
}

/// Leaf keys of a TOML value (tables and arrays of tables are walked, not listed).
fn leaf_keys(v: &toml::Value, out: &mut BTreeSet<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let nested = matches!(v, toml::Value::Table(_))
                    || matches!(v, toml::Value::Array(a) if a.iter().all(toml::Value::is_table) && !a.is_empty());
                if nested {
                    leaf_keys(v, out);
                } else {
                    out.insert(k.clone());
                }
            }
        }
        toml::Value::Array(a) => a.iter().for_each(|v| leaf_keys(v, out)),
        _ => {}
    }
}

#[test]
fn the_configuration_reference_names_every_field_of_the_reference_config() {
    let cfg = read("config/ringlb.toml");
    let parsed: toml::Value = toml::from_str(&cfg).expect("config/ringlb.toml is TOML");
    let mut keys = BTreeSet::new();
    leaf_keys(&parsed, &mut keys);
    // Fields shown commented out, written `# key = value`.
    for line in cfg.lines() {
        if let Some((k, _)) = line.strip_prefix("# ").and_then(|l| l.split_once(" = ")) {
            if !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                keys.insert(k.to_string());
            }
        }
    }
    assert!(keys.len() > 30, "too few fields found: {keys:?}");
    let readme = read("README.md");
    let reference = section(&readme, "## Configuration reference");
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| {
            !reference.contains(&format!(".{k}`")) && !reference.contains(&format!("`{k}`"))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "README's configuration reference does not name {missing:?}"
    );
}

#[test]
fn the_quick_start_config_passes_check() {
    let readme = read("README.md");
    let quick = section(&readme, "## Quick start");
    let start = quick
        .find("```toml\n")
        .expect("a toml block in Quick start")
        + 8;
    let toml = &quick[start..start + quick[start..].find("```").expect("end of block")];
    let file = TempFile::new("readme-quick-start", "toml", toml);
    let out = run_ringlb(
        &["check", "--config", file.path().to_str().expect("utf-8")],
        Duration::from_secs(10),
    );
    assert!(
        out.status.success(),
        "the Quick start config fails `ringlb check`:\n{toml}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
}

#[test]
fn the_readme_has_the_test_command_ci_runs() {
    let readme = read("README.md");
    let start = readme
        .find("<!-- test-command -->\n```sh\n")
        .expect("start marker");
    let end = readme
        .find("```\n<!-- /test-command -->")
        .expect("end marker");
    let cmd = &readme[start..end];
    assert!(cmd.contains("cargo test"), "{cmd}");
    assert!(cmd.contains("RINGLB_IO=epoll"), "{cmd}");
}
