//! `skiff-log`: the log driver containerd's shim runs for each container
//! (a `binary://` log URI). Its first argument is the log file; the
//! container's stdout and stderr arrive on fds 3 and 4, and closing fd 5
//! tells the shim it is ready. The second argument is the size at which
//! the file rotates. It writes CRI-format records until both streams end,
//! which is when the container's process exits.

use std::os::fd::FromRawFd as _;
use std::sync::{Arc, Mutex};

use skiff_agent::kubelet::logs;

fn main() -> std::process::ExitCode {
    let Some(path) = std::env::args().nth(1).filter(|p| !p.is_empty()) else {
        eprintln!("skiff-log: the log file is the first argument");
        return std::process::ExitCode::from(2);
    };
    let path = std::path::PathBuf::from(path);
    let max_size = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(logs::MAX_SIZE);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let file = match logs::Rotating::open(&path, max_size) {
        Ok(f) => Arc::new(Mutex::new(f)),
        Err(e) => {
            eprintln!("skiff-log: {}: {e}", path.display());
            return std::process::ExitCode::from(1);
        }
    };
    // SAFETY: the shim hands these descriptors over for us alone to own.
    let (stdout, stderr, ready) = unsafe {
        (
            std::fs::File::from_raw_fd(3),
            std::fs::File::from_raw_fd(4),
            std::fs::File::from_raw_fd(5),
        )
    };
    drop(ready);
    let f2 = file.clone();
    let err = std::thread::spawn(move || logs::copy_stream(stderr, "stderr", &f2));
    let out = logs::copy_stream(stdout, "stdout", &file);
    let err = err.join().unwrap_or(Ok(()));
    match out.and(err) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skiff-log: {}: {e}", path.display());
            std::process::ExitCode::from(1)
        }
    }
}
