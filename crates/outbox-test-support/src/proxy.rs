use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Forward, but hold each chunk for this many milliseconds first, one chunk after another
    /// (a stalled link: what arrives meanwhile waits its own turn).
    Delay(u64),
    /// Forward each chunk this many milliseconds after it arrived, chunks in flight together (a
    /// link with this one-way latency: two requests sent together arrive together).
    Latency(u64),
    /// Accept and read, forward nothing (a network partition that does not reset connections).
    Blackhole,
    /// Reset every connection, and refuse new ones, until set back.
    Drop,
}

/// A fault-injecting TCP proxy on loopback, for network stalls between the relay and
/// PostgreSQL or Kafka. Lives as long as the runtime it was started on.
pub struct TcpProxy {
    port: u16,
    target: Arc<Mutex<String>>,
    /// Bumped by [`TcpProxy::retarget`]: connections of an older generation close.
    generation: Arc<AtomicU64>,
    mode: Arc<AtomicU8>,
    delay_ms: Arc<AtomicU64>,
    changed: watch::Sender<()>,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards to `target` (`host:port`).
    pub async fn start(target: &str) -> Self {
        // Bound at once (a port found free and bound later may be taken meanwhile, by another
        // listener or an outgoing connection's ephemeral port), but never one handed out to a
        // broker that has yet to start.
        let (listener, port) = loop {
            let listener = TcpListener::bind(("127.0.0.1", 0))
                .await
                .expect("bind the proxy");
            let port = listener.local_addr().expect("proxy address").port();
            if crate::broker::claim_port(port) {
                break (listener, port);
            }
        };
        let (changed, _) = watch::channel(());
        let proxy = TcpProxy {
            port,
            target: Arc::new(Mutex::new(target.to_owned())),
            generation: Arc::new(AtomicU64::new(0)),
            mode: Arc::new(AtomicU8::new(0)),
            delay_ms: Arc::new(AtomicU64::new(0)),
            changed,
        };
        let (target, generation, mode, delay, changed) = (
            proxy.target.clone(),
            proxy.generation.clone(),
            proxy.mode.clone(),
            proxy.delay_ms.clone(),
            proxy.changed.clone(),
        );
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if mode.load(Ordering::SeqCst) == 3 {
                    continue; // Drop: refuse by closing at once
                }
                let target = target.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let link = Link {
                    born: generation.load(Ordering::SeqCst),
                    generation: generation.clone(),
                    mode: mode.clone(),
                    delay: delay.clone(),
                };
                let changed = changed.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let up = pump(client_read, server_write, link.clone(), changed.clone());
                    let down = pump(server_read, client_write, link, changed);
                    tokio::select! { _ = up => {}, _ = down => {} }
                });
            }
        });
        proxy
    }

    /// Sends new connections to `target` and closes the open ones, as a load balancer in front
    /// of a database cluster does when its health check finds a new primary.
    pub fn retarget(&self, target: &str) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = target.to_owned();
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.changed.send_replace(());
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
            Fault::Latency(ms) => (4, ms),
        };
        self.delay_ms.store(delay, Ordering::SeqCst);
        self.mode.store(mode, Ordering::SeqCst);
        self.changed.send_replace(());
    }
}

/// One proxied connection's view of the proxy's state.
#[derive(Clone)]
struct Link {
    born: u64,
    generation: Arc<AtomicU64>,
    mode: Arc<AtomicU8>,
    delay: Arc<AtomicU64>,
}

impl Link {
    /// The fault now, with a retargeted proxy's older connections dropped.
    fn mode(&self) -> u8 {
        if self.generation.load(Ordering::SeqCst) != self.born {
            3
        } else {
            self.mode.load(Ordering::SeqCst)
        }
    }
}

/// Forwards `from` to `to` as the proxy's fault says: a reader, and a writer that sends each
/// chunk at the time the reader gave it.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Link,
    mut changed: watch::Receiver<()>,
) {
    // Bounded: a destination that stops reading stops the reader too, as a link would.
    let (chunks, mut pending) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(16);
    let writer = async move {
        while let Some((at, chunk)) = pending.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    let reader_link = link.clone();
    let reader = async move {
        let link = reader_link;
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            if link.mode() == 3 {
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
            let arrived = tokio::time::Instant::now();
            // Blackhole: hold the data until the fault is lifted (or the connection is dropped).
            while link.mode() == 2 {
                if changed.changed().await.is_err() {
                    return;
                }
            }
            let delay = Duration::from_millis(link.delay.load(Ordering::SeqCst));
            let at = match link.mode() {
                1 => {
                    tokio::time::sleep(delay).await;
                    tokio::time::Instant::now()
                }
                3 => return,
                4 => arrived + delay,
                _ => arrived,
            };
            if chunks.send((at, buffer[..n].to_vec())).await.is_err() {
                return;
            }
        }
    };
    // The reader ends on a closed or dropped connection, and the writer once it has sent what
    // the reader gave it; the proxy closes both directions when either direction ends.
    tokio::join!(reader, writer);
}
