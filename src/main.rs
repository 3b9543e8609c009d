//! The `motorpool` executable: the command line of [`motorpool::cli`], with
//! the providers and engines compiled in ([`motorpool::registry::Registry::builtin`]).

fn main() -> std::process::ExitCode {
    motorpool::cli::main()
}
