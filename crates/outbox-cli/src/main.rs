//! The `outbox` command. Logic lives in the library; this only maps the outcome to an exit code.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    outbox_cli::main().await
}
