//! The few rtnetlink operations Skiff needs, shared by the overlay (agent),
//! the CNI plugin and the tests: links (bridge, veth, vxlan), addresses,
//! routes, neighbour and FDB entries.
//!
//! One [`Netlink`] wraps one rtnetlink socket; each method is one request
//! (or one dump) to the kernel. A socket belongs to the network namespace it
//! was opened in, so [`Netlink::open_in`] opens one inside another namespace
//! and then returns the calling thread to where it was: requests on it act
//! in that namespace while the thread stays home.
//!
//! The methods are async because rtnetlink is; callers run them on a
//! current-thread runtime (the CNI plugin) or the agent's runtime.

mod link;
mod neigh;
mod netns;
mod route;

use std::num::NonZeroI32;

pub use link::{Link, VxlanSpec};
pub use neigh::{FdbEntry, Neighbour};
pub use netns::NetnsGuard;
pub use route::{Family, Route, RouteTo};

/// Routes Skiff installs carry this protocol number (`proto 83` in
/// `ip route`), so a resync can tell its own routes from everyone else's.
pub const SKIFF_ROUTE_PROTOCOL: u8 = 83;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("network namespace {path}: {source}")]
    Netns {
        path: String,
        #[source]
        source: nix::Error,
    },
    #[error("{what}: {source}")]
    Request {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no link named {0}")]
    NoLink(String),
    #[error("joining the kernel's link notifications: {0}")]
    Subscribe(#[source] std::io::Error),
}

impl Error {
    /// The errno of a kernel refusal, if that is what this is.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Request {
                source: rtnetlink::Error::NetlinkError(m),
                ..
            } => m.code.map(NonZeroI32::get).map(|c| -c),
            Error::Netns { source, .. } => Some(*source as i32),
            _ => None,
        }
    }

    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NoLink(_))
            || matches!(
                self.errno(),
                Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ESRCH)
            )
    }
}

pub type Result<T> = std::result::Result<T, Error>;

fn request(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let what = what.into();
    move |source| Error::Request { what, source }
}

/// A handle on one rtnetlink socket.
#[derive(Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
}

impl Netlink {
    /// A socket in the calling thread's network namespace. Must be called
    /// inside a tokio runtime: the socket's reader runs as a task on it.
    pub fn open() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(Error::Socket)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// A socket in the network namespace at `path` (`/run/netns/x`,
    /// `/proc/<pid>/ns/net`); the calling thread is back in its own
    /// namespace when this returns.
    pub fn open_in(path: &str) -> Result<Self> {
        let _guard = NetnsGuard::enter(path)?;
        Self::open()
    }
}

/// The kernel's link notifications (a link made, changed or deleted) in
/// the calling thread's network namespace: one item per notification,
/// nothing in it but that it came. The stream ends if the socket's reader
/// does. Must be called inside a tokio runtime, as [`Netlink::open`].
pub fn link_events() -> Result<impl futures::Stream<Item = ()> + Send + Unpin> {
    use futures::StreamExt;
    use rtnetlink::sys::{AsyncSocket, SocketAddr};
    let (mut conn, _, messages) = rtnetlink::new_connection().map_err(Error::Socket)?;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, rtnetlink::constants::RTMGRP_LINK))
        .map_err(Error::Subscribe)?;
    tokio::spawn(conn);
    Ok(messages.map(|_| ()))
}
