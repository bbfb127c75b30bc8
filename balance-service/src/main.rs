//! `farebox-balance`: the reference balance service. See `--help` and
//! `docs/balance-service.md`.

use farebox_balance::config::{self, Parsed, USAGE};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cfg = match config::parse(std::env::args().skip(1)) {
        Ok(Parsed::Run(cfg)) => *cfg,
        Ok(Parsed::Migrate(url)) => return migrate(&url),
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("farebox-balance: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    farebox_balance::logging::init();
    let rt = match runtime(tokio::runtime::Builder::new_multi_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(farebox_balance::service::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("farebox-balance: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the tokio runtime; a failure is reported here and becomes the exit
/// status.
fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("farebox-balance: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })
}

/// `farebox-balance migrate`: applies the pending migrations and exits.
fn migrate(url: &farebox_balance::store::DatabaseUrl) -> ExitCode {
    let rt = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(farebox_balance::store::Store::migrate(url)) {
        Ok((before, after)) => {
            println!(
                "farebox-balance: {}: schema version {after} (was {before})",
                url.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("farebox-balance: migrate {}: {e}", url.display());
            ExitCode::FAILURE
        }
    }
}
