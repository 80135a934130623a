//! `skiff-cni`: reads the CNI environment and stdin, runs the command, and
//! answers on stdout (result or error JSON) with the spec's exit status.

use std::io::{Read, Write};
use std::process::ExitCode;

use skiff_cni::spec::{CniError, Code, Env, version_of};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        return reply_error(
            &CniError::new(Code::Io, "reading stdin").with_details(e),
            &stdin,
        );
    }
    let env = match Env::read(|k| std::env::var(k).ok()) {
        Ok(e) => e,
        Err(e) => return reply_error(&e, &stdin),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(r) => r,
        Err(e) => return reply_error(&CniError::new(Code::Io, "starting").with_details(e), &stdin),
    };
    match runtime.block_on(skiff_cni::plugin::run(&env, &stdin)) {
        Ok(Some(v)) => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{v}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => reply_error(&e, &stdin),
    }
}

fn reply_error(e: &CniError, stdin: &[u8]) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", e.to_json(&version_of(stdin)));
    ExitCode::FAILURE
}
