//! The `cutover` binary: everything is in the library's command line, [`cutover::cli`].

fn main() -> std::process::ExitCode {
    cutover::cli::main()
}
