use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Forward, but hold each chunk for this many milliseconds first.
    Delay(u64),
    /// Accept and read, forward nothing (a network partition that does not reset connections).
    Blackhole,
    /// Reset every connection, and refuse new ones, until set back.
    Drop,
}

/// A fault-injecting TCP proxy on loopback, for network stalls between the relay and
/// PostgreSQL or Kafka. Lives as long as the runtime it was started on.
pub struct TcpProxy {
    port: u16,
    mode: Arc<AtomicU8>,
    delay_ms: Arc<AtomicU64>,
    changed: watch::Sender<()>,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards to `target` (`host:port`).
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", crate::free_port()))
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (changed, _) = watch::channel(());
        let proxy = TcpProxy {
            port,
            mode: Arc::new(AtomicU8::new(0)),
            delay_ms: Arc::new(AtomicU64::new(0)),
            changed,
        };
        let (target, mode, delay, changed) = (
            target.to_owned(),
            proxy.mode.clone(),
            proxy.delay_ms.clone(),
            proxy.changed.clone(),
        );
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if mode.load(Ordering::SeqCst) == 3 {
                    continue; // Drop: refuse by closing at once
                }
                let (target, mode, delay, changed) = (
                    target.clone(),
                    mode.clone(),
                    delay.clone(),
                    changed.subscribe(),
                );
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let up = pump(
                        client_read,
                        server_write,
                        mode.clone(),
                        delay.clone(),
                        changed.clone(),
                    );
                    let down = pump(server_read, client_write, mode, delay, changed);
                    tokio::select! { _ = up => {}, _ = down => {} }
                });
            }
        });
        proxy
    }

    /// `127.0.0.1:<port>` of the proxy.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Switches the fault for all connections, open and new.
    pub fn set(&self, fault: Fault) {
        let (mode, delay) = match fault {
            Fault::Pass => (0, 0),
            Fault::Delay(ms) => (1, ms),
            Fault::Blackhole => (2, 0),
            Fault::Drop => (3, 0),
        };
        self.delay_ms.store(delay, Ordering::SeqCst);
        self.mode.store(mode, Ordering::SeqCst);
        self.changed.send_replace(());
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<AtomicU8>,
    delay: Arc<AtomicU64>,
    mut changed: watch::Receiver<()>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if mode.load(Ordering::SeqCst) == 3 {
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            // Wake to notice a switch to Drop while idle.
            _ = changed.changed() => continue,
        };
        let Ok(n) = read else { return };
        if n == 0 {
            return;
        }
        // Blackhole: hold the data until the fault is lifted (or the connection is dropped).
        while mode.load(Ordering::SeqCst) == 2 {
            if changed.changed().await.is_err() {
                return;
            }
        }
        match mode.load(Ordering::SeqCst) {
            1 => tokio::time::sleep(Duration::from_millis(delay.load(Ordering::SeqCst))).await,
            3 => return,
            _ => {}
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
