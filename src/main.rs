//! The `ringlb` binary: parse the command line, load the config through the one shared path,
//! start the logger the config asks for, run. Errors become exit codes: 2 for configuration
//! errors, 1 for runtime failures; in `run` each is one line (log shippers read lines).

use clap::Parser;
use ringlb::cli::{Cli, Command};
use ringlb::config::Config;
use ringlb::logging;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Where this binary was started from: a binary upgrade starts that path again.
    ringlb::upgrade::record_origin();
    let cli = Cli::parse();
    let (path, demo) = match &cli.command {
        Command::Run { config } => (config, false),
        Command::Check { config } => (config, false),
        Command::Demo { config } => (config, true),
        Command::Man { dir } => {
            return match ringlb::cli::write_man_pages(dir) {
                Ok(files) => {
                    files.iter().for_each(|f| println!("{}", f.display()));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: writing man pages into {}: {e}", dir.display());
                    ExitCode::from(1)
                }
            };
        }
        Command::Completions { shell } => {
            ringlb::cli::write_completions(*shell, &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
    };
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            // `check` talks to a person at a terminal: toml's multi-line excerpt with the caret
            // helps there. `run` talks to a journal or a log shipper: one line.
            if let Command::Check { .. } = cli.command {
                eprintln!("error: {e}");
            } else {
                eprintln!("error: {}", logging::one_line(&e.to_string()));
                // Started by a binary upgrade: the old process says why in its answer.
                ringlb::upgrade::report_failure(&format!(
                    "configuration: {}",
                    logging::one_line(&e.to_string())
                ));
            }
            return ExitCode::from(2);
        }
    };
    // check and run print the same warnings (the limit run will raise its soft limit to):
    // `check` on stderr as `warning: ...`, `run` as log records in the configured format.
    let warnings = config.warnings(ringlb::sys::nofile_limit().1);
    if let Command::Check { .. } = cli.command {
        for w in &warnings {
            eprintln!("warning: {}", logging::one_line(w));
        }
        println!("{}", config.summary());
        check_dns(&config);
        // What `run` would use on this host (the same probe).
        match ringlb::io::choose(config.runtime.io) {
            Ok(c) => println!("{}", c.line),
            Err(e) => println!("io: unavailable: {e}"),
        }
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    if let Err(e) = logging::init(&config.log) {
        eprintln!("error: {}", logging::one_line(&e));
        return ExitCode::from(1);
    }
    for w in &warnings {
        log::warn!("{w}");
    }
    let code = run(config, path, demo);
    logging::shutdown();
    code
}

/// `check`: resolves every discovery name and host-name backend once and prints what it found;
/// a name that does not resolve is a warning (the pool would start without those backends).
fn check_dns(config: &Config) {
    let names: Vec<(String, &ringlb::config::Discovery)> = config
        .listeners
        .iter()
        .flat_map(|l| l.pools.iter().map(move |p| (l, p)))
        .flat_map(|(l, p)| {
            let scope = if p.name == ringlb::config::IMPLICIT_POOL {
                format!("listener {:?}", l.name)
            } else {
                format!("listener {:?}, pool {:?}", l.name, p.name)
            };
            p.discovery.iter().map(move |d| (scope.clone(), d))
        })
        .collect();
    if names.is_empty() {
        return;
    }
    let only: Vec<&ringlb::config::Discovery> = names.iter().map(|(_, d)| *d).collect();
    let outcomes = match ringlb::control::resolve::resolve_all(&config.dns, &only) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("warning: dns: {e}");
            return;
        }
    };
    use ringlb::control::resolve::Outcome;
    for ((scope, d), o) in names.iter().zip(outcomes) {
        let what = format!("{scope}: {} {}", d.field, d.describe());
        match o {
            Outcome::Found { found, .. } => {
                let list: Vec<String> = found
                    .iter()
                    .map(|f| {
                        if d.kind == ringlb::config::RecordKind::Srv {
                            format!("{} weight {} priority {}", f.address, f.weight, f.priority)
                        } else {
                            f.address.to_string()
                        }
                    })
                    .collect();
                println!("dns: {what}: {} backends: {}", list.len(), list.join(", "));
            }
            Outcome::Empty(why) | Outcome::Failed(why) => eprintln!(
                "warning: dns: {what}: does not resolve ({why}); the pool starts without \
                 these backends and asks again every refresh"
            ),
        }
    }
}

fn run(config: Config, path: &std::path::Path, demo: bool) -> ExitCode {
    if demo {
        // The demo's threads start before the runtime blocks its signals: they inherit a mask
        // that blocks everything, so a SIGHUP or SIGTERM always reaches the runtime's wait.
        let all = nix::sys::signal::SigSet::all();
        let previous = all.thread_swap_mask(nix::sys::signal::SigmaskHow::SIG_BLOCK);
        let started = ringlb::demo::start_backends(&config);
        if let Ok(previous) = previous {
            let _ = previous.thread_set_mask();
        }
        if let Err(e) = started {
            logging::fatal(&format!("demo backends: {}", logging::error_chain(&e)));
            return ExitCode::from(1);
        }
    }
    match ringlb::runtime::run(config, path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            logging::fatal(&logging::error_chain(&e));
            ringlb::upgrade::report_failure(&logging::error_chain(&e));
            ExitCode::from(1)
        }
    }
}
