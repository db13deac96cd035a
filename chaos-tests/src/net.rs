//! Network faults between the nodes of one test cluster, with nftables.
//!
//! Every node of a cluster has its own loopback address (`127.a.b.1x`) and
//! sends its peer traffic from it, so a rule matching a pair of addresses cuts
//! exactly one direction of one link, like a cable between two hosts. The
//! rules live in a table of their own, named after the cluster, removed on
//! drop. Only loopback addresses of the cluster are ever matched.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// The nftables table of one cluster's network faults.
#[derive(Debug)]
pub struct Net {
    table: String,
}

/// Why nftables could not be used.
#[derive(Debug, thiserror::Error)]
#[error("nft {args}: {message}")]
pub struct NetError {
    args: String,
    message: String,
}

fn nft(args: &str) -> Result<(), NetError> {
    let out = Command::new("nft")
        .args(args.split(' '))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NetError {
            args: args.into(),
            message: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError {
            args: args.into(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn check_loopback(ip: Ipv4Addr) {
    assert!(
        ip.is_loopback(),
        "network faults only ever match loopback addresses, not {ip}"
    );
}

impl Net {
    /// Creates an empty table for the cluster tagged `tag` (letters, digits, `_`).
    pub fn new(tag: &str) -> Result<Net, NetError> {
        let table = format!("mailvault_chaos_{tag}");
        let _ = nft(&format!("delete table ip {table}"));
        nft(&format!("add table ip {table}"))?;
        let net = Net { table };
        nft(&format!(
            "add chain ip {} faults {{ type filter hook output priority 0 ; policy accept ; }}",
            net.table
        ))?;
        Ok(net)
    }

    /// Whether nftables works here (root, a kernel with nf_tables).
    pub fn available() -> bool {
        match Net::new("probe") {
            Ok(n) => {
                drop(n);
                true
            }
            Err(_) => false,
        }
    }

    /// Drops every packet from `from` to `to` (one direction of one link).
    pub fn cut(&self, from: Ipv4Addr, to: Ipv4Addr) -> Result<(), NetError> {
        check_loopback(from);
        check_loopback(to);
        nft(&format!(
            "add rule ip {} faults ip saddr {from} ip daddr {to} drop",
            self.table
        ))
    }

    /// Drops a share (`percent`, 1–99) of the packets from `from` to `to`.
    pub fn lossy(&self, from: Ipv4Addr, to: Ipv4Addr, percent: u32) -> Result<(), NetError> {
        check_loopback(from);
        check_loopback(to);
        nft(&format!(
            "add rule ip {} faults ip saddr {from} ip daddr {to} numgen random mod 100 < {} drop",
            self.table,
            percent.clamp(1, 99)
        ))
    }

    /// Slows the link from `from` to `to` to `kib_per_sec` KiB/s: packets over
    /// the rate are dropped, so TCP backs off and retransmits, and messages
    /// take seconds instead of microseconds (`tc netem` delay is not
    /// available here; a rate limit is what nftables can do).
    pub fn slow(&self, from: Ipv4Addr, to: Ipv4Addr, kib_per_sec: u32) -> Result<(), NetError> {
        check_loopback(from);
        check_loopback(to);
        nft(&format!(
            "add rule ip {} faults ip saddr {from} ip daddr {to} limit rate over {} kbytes/second drop",
            self.table,
            kib_per_sec.max(1)
        ))
    }

    /// Cuts both directions between every node of `a` and every node of `b`.
    pub fn partition(&self, a: &[Ipv4Addr], b: &[Ipv4Addr]) -> Result<(), NetError> {
        for &x in a {
            for &y in b {
                self.cut(x, y)?;
                self.cut(y, x)?;
            }
        }
        Ok(())
    }

    /// Removes every fault.
    pub fn heal(&self) -> Result<(), NetError> {
        nft(&format!("flush chain ip {} faults", self.table))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = nft(&format!("delete table ip {}", self.table));
    }
}
