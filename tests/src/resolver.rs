//! dnsmasq as a test's upstream resolver: in a namespace the test made,
//! on one of its addresses, port 53, in the foreground (killed with the
//! test), reading no host files or resolv.conf, so it answers only what
//! the test gives it and never asks a real resolver.

use crate::{Netns, Proc, Spawn};

/// dnsmasq in `netns` on `ip`, with the test's own `options` (records,
/// TTLs, logging), its output to `log`.
pub fn dnsmasq(netns: &Netns, ip: &str, options: &[&str], log: &std::path::Path) -> Proc {
    Spawn::new("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address",
            ip,
            "--port",
            "53",
            "--user=root",
            "--pid-file=",
            "--log-facility=-",
        ])
        .args(options)
        .netns(netns)
        .log_to(log)
        .start()
}
