//! Entering a network namespace for the calling thread only.

use std::fs::File;
use std::marker::PhantomData;

use nix::sched::{CloneFlags, setns};

use crate::{Error, Result};

/// While alive, the calling thread is in another network namespace; on drop
/// it goes back. `setns` moves only the calling thread, so the guard is
/// neither `Send` nor `Sync`.
pub struct NetnsGuard {
    home: File,
    _not_send: PhantomData<*const ()>,
}

impl NetnsGuard {
    pub fn enter(path: &str) -> Result<Self> {
        let netns_err = |path: &str| {
            let path = path.to_string();
            move |e: std::io::Error| Error::Netns {
                path,
                source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            }
        };
        let home = File::open("/proc/thread-self/ns/net")
            .map_err(netns_err("/proc/thread-self/ns/net"))?;
        let target = File::open(path).map_err(netns_err(path))?;
        setns(&target, CloneFlags::CLONE_NEWNET).map_err(|source| Error::Netns {
            path: path.to_string(),
            source,
        })?;
        Ok(Self {
            home,
            _not_send: PhantomData,
        })
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // Failing to return would leave the thread in the wrong namespace for
        // everything after: that is not recoverable.
        if let Err(e) = setns(&self.home, CloneFlags::CLONE_NEWNET) {
            panic!("returning to the original network namespace: {e}");
        }
    }
}
