//! A client that is neither on loopback nor a peer: a network namespace joined to the test's by
//! a veth pair of private addresses (`10.77.x.y/30`), reachable only from this machine. The node
//! under test listens on the host side's address; connections made from inside the namespace
//! come from the other side's. Needs root and `ip` (iproute2).

use std::{
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use super::tools::{skip_or_fail_in_ci, which};

pub struct Netns {
    name: String,
    /// This side of the veth pair (where a node listens).
    pub host_ip: Ipv4Addr,
    /// The namespace's side (where its clients connect from).
    pub ns_ip: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// A fresh namespace and veth pair; `None` after saying loudly why not (a failure under
    /// `CI=true`, which runs as root).
    pub fn new(test: &str) -> Option<Netns> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = std::process::id() % 100_000;
        // One /30 per namespace: 16384 of them in 10.77.0.0/16.
        let block = (id * 16 + n) % 16_384;
        let base = u32::from(Ipv4Addr::new(10, 77, 0, 0)) + block * 4;
        let ns = Netns {
            name: format!("lpx{id}n{n}"),
            host_ip: Ipv4Addr::from(base + 1),
            ns_ip: Ipv4Addr::from(base + 2),
        };
        if which("ip").is_none() || unsafe { libc::geteuid() } != 0 {
            skip_or_fail_in_ci(test, "a network namespace needs root and `ip` (iproute2)");
            return None;
        }
        let (a, b) = (format!("{}a", ns.name), format!("{}b", ns.name));
        let host = format!("{}/30", ns.host_ip);
        let inside = format!("{}/30", ns.ns_ip);
        let made = ip(&["netns", "add", &ns.name])
            .and_then(|_| ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]))
            .and_then(|_| ip(&["link", "set", &b, "netns", &ns.name]))
            .and_then(|_| ip(&["addr", "add", &host, "dev", &a]))
            .and_then(|_| ip(&["link", "set", &a, "up"]))
            .and_then(|_| ip(&["-n", &ns.name, "addr", "add", &inside, "dev", &b]))
            .and_then(|_| ip(&["-n", &ns.name, "link", "set", &b, "up"]))
            .and_then(|_| ip(&["-n", &ns.name, "link", "set", "lo", "up"]));
        match made {
            Ok(()) => Some(ns),
            Err(why) => {
                drop(ns);
                skip_or_fail_in_ci(test, &format!("cannot make a network namespace: {why}"));
                None
            }
        }
    }

    /// A TCP connection to `addr` made from inside the namespace.
    pub fn connect(&self, addr: SocketAddr) -> tokio::net::TcpStream {
        let path = format!("/var/run/netns/{}", self.name);
        let stream = std::thread::spawn(move || {
            // setns changes the calling thread only; the socket keeps the namespace it was made in.
            let ns = std::fs::File::open(&path).unwrap();
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            std::net::TcpStream::connect(addr).unwrap()
        })
        .join()
        .unwrap();
        stream.set_nonblocking(true).unwrap();
        tokio::net::TcpStream::from_std(stream).unwrap()
    }
}

impl Drop for Netns {
    /// Deleting the namespace deletes the veth pair with it.
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &format!("{}a", self.name)]);
    }
}
