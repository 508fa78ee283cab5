//! Binding the two listeners. The defaults are `[::]:9443` and `[::]:8080`: the IPv6
//! wildcard, opened dual-stack (`IPV6_V6ONLY` off whatever the node's
//! `net.ipv6.bindv6only`), so IPv4, IPv6 and dual-stack clusters alike reach the webhook and
//! the probes. On a node whose kernel has no IPv6 at all, `[::]` falls back to `0.0.0.0` on
//! the same port (with a warning) instead of failing, as Go's `:9443` does.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Pending connections the kernel queues before `accept`.
const BACKLOG: i32 = 1024;

/// Binds a non-blocking TCP listener on `addr`; see the module documentation for `[::]`.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let dual_stack = matches!(addr, SocketAddr::V6(a) if a.ip().is_unspecified());
    match open(addr, dual_stack) {
        Err(e) if dual_stack && no_ipv6(&e) => {
            let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()));
            tracing::warn!(%addr, fallback = %v4, error = %e, "IPv6 is not available on this node; listening on IPv4 only");
            open(v4, false)
        }
        other => other,
    }
}

fn open(addr: SocketAddr, dual_stack: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if dual_stack {
        socket.set_only_v6(false)?;
    }
    // As std does: a restarted server can bind while old connections are in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// The errors of a kernel without IPv6 (module absent, or disabled at boot).
fn no_ipv6(e: &io::Error) -> bool {
    const EAFNOSUPPORT: i32 = 97;
    const EADDRNOTAVAIL: i32 = 99;
    matches!(e.raw_os_error(), Some(EAFNOSUPPORT | EADDRNOTAVAIL))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Accepts one connection on `listener` through `to` and echoes a byte.
    fn reach(listener: &TcpListener, to: SocketAddr) {
        let mut client = std::net::TcpStream::connect(to).unwrap();
        listener.set_nonblocking(false).unwrap();
        let (mut server, peer) = listener.accept().unwrap();
        listener.set_nonblocking(true).unwrap();
        assert_eq!(
            peer.ip().to_canonical(),
            to.ip(),
            "peer of a connection to {to}"
        );
        client.write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        server.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
    }

    #[test]
    fn the_default_wildcard_accepts_ipv4_and_ipv6() {
        let listener = bind("[::]:0".parse().unwrap()).unwrap();
        let local = listener.local_addr().unwrap();
        assert!(local.is_ipv6(), "{local}");
        reach(&listener, SocketAddr::from(([127, 0, 0, 1], local.port())));
        reach(
            &listener,
            SocketAddr::from(([0u16, 0, 0, 0, 0, 0, 0, 1], local.port())),
        );
    }

    #[test]
    fn a_specific_address_is_bound_as_given() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let local = listener.local_addr().unwrap();
        assert_eq!(local.ip().to_string(), "127.0.0.1");
        reach(&listener, local);
        let listener = bind("[::1]:0".parse().unwrap()).unwrap();
        let local = listener.local_addr().unwrap();
        assert_eq!(local.ip().to_string(), "::1");
        reach(&listener, local);
    }
}
