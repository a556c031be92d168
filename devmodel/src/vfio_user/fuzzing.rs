//! Entry point of the `vfio_user` fuzz target (feature `fuzzing`, not for
//! production): the server's message handling driven on the caller's
//! thread, one message at a time, from one end of a socket pair. No event
//! loop and no timers, so an input cannot make the harness wait: the caller
//! only asks for a message once its bytes are in the socket (or the socket
//! is shut down).

use std::os::unix::net::UnixStream;
use std::path::Path;

use hcd_emul::pci::{PciController, PciFunction};
use hcd_emul::GuestRam;

use super::{ConnError, Server, ServerError};

/// A server with one connected client whose other end the caller holds.
pub struct FuzzSession<C: PciController> {
    server: Server<C>,
    conn: UnixStream,
}

impl<C: PciController> std::fmt::Debug for FuzzSession<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuzzSession").finish()
    }
}

impl<C: PciController> FuzzSession<C> {
    /// A server as [`Server::new`] builds it (it binds `path`, which must
    /// not exist; nothing connects there) and the client's end of a
    /// connection to it.
    pub fn new(
        path: &Path,
        make: impl FnOnce(GuestRam, Box<dyn Fn() + Send + Sync>) -> C,
    ) -> Result<(Self, UnixStream), ServerError> {
        let server = Server::new(path, make)?;
        let (client, conn) = UnixStream::pair().map_err(ServerError::Poll)?;
        Ok((Self { server, conn }, client))
    }

    /// Reads and answers one message. On an error that makes the real
    /// server drop its client, the client is dropped the same way (device
    /// reset, DMA mappings and eventfds gone) and the reason returned; the
    /// caller may then [`reconnect`](Self::reconnect).
    pub fn serve_one(&mut self) -> Result<(), String> {
        match self.server.serve_from(&self.conn) {
            Ok(()) => Ok(()),
            Err(e) => {
                let msg = e.to_string();
                self.server.disconnect(&e);
                Err(msg)
            }
        }
    }

    /// A new connection, as after a client's reconnect; the client's end.
    pub fn reconnect(&mut self) -> std::io::Result<UnixStream> {
        let (client, conn) = UnixStream::pair()?;
        self.conn = conn;
        Ok(client)
    }

    /// What the server does when the client hangs up.
    pub fn hang_up(&mut self) {
        self.server.disconnect(&ConnError::Closed);
    }

    /// The controller's deferred work (what a completion wake-up or a
    /// deadline runs).
    pub fn process(&mut self) {
        self.server.pci.process();
    }

    /// The PCI function served.
    pub fn pci(&self) -> &PciFunction<C> {
        &self.server.pci
    }

    /// The number of DMA mappings.
    pub fn dma_mappings(&self) -> usize {
        self.server.dma.len()
    }
}
