use clap::Parser;
use lathe::cli;

fn main() {
    // The sandbox's init is lathe re-executed; it must not start threads before unshare.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == lathe::sandbox::INIT_ARG)
    {
        lathe::sandbox::child::sandbox_init();
    }
    let parsed = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { cli::EXIT_USAGE } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let level = match (parsed.global.quiet, parsed.global.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LATHE_LOG")
                .unwrap_or_else(|_| level.into()),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    match cli::run(parsed) {
        Ok(0) => {}
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("lathe: error: {err:#}");
            std::process::exit(cli::exit_code(&err));
        }
    }
}
