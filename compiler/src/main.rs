use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = griffinc::cli::Cli::parse();
    match griffinc::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the context chain joined by ": ".
            let message = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
