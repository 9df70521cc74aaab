//! The `ringlb` binary: parse the command line, load the config through the one shared path,
//! run. Errors become exit codes: 2 for configuration errors, 1 for runtime failures.

use clap::Parser;
use ringlb::cli::{Cli, Command};
use ringlb::config::Config;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let (path, demo) = match &cli.command {
        Command::Run { config } => (config, false),
        Command::Check { config } => (config, false),
        Command::Demo { config } => (config, true),
    };
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // check and run print the same warnings (the limit run will raise its soft limit to).
    for w in config.warnings(ringlb::sys::nofile_limit().1) {
        log::warn!("{w}");
    }
    if let Command::Check { .. } = cli.command {
        println!("{}", config.summary());
        // What `run` would use on this host (the same probe).
        match ringlb::io::choose(config.runtime.io) {
            Ok(c) => println!("{}", c.line),
            Err(e) => println!("io: unavailable: {e}"),
        }
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    if demo {
        if let Err(e) = ringlb::demo::start_backends(&config) {
            eprintln!("error: demo backends: {e}");
            return ExitCode::from(1);
        }
    }
    match ringlb::runtime::run(config, path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
