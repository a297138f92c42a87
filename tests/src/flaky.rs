//! A fault-injecting TCP proxy for the flapping-network test: it forwards a device's MQTT
//! connection to the broker and, on command, cuts it. A cut is a reset (every connection
//! through it is closed and new ones are closed as soon as they are accepted) or a blackhole
//! (connections stay open but nothing passes either way until the link comes back, the way a
//! dead mobile link looks to both ends). It records when bytes the broker sent while the link was
//! up reached the device, so the test can tell how long the device took to get traffic flowing
//! again after each cut.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The state of the proxied link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Up,
    /// Connections are closed; new ones are closed at once.
    Reset,
    /// Connections stay open; nothing passes.
    Blackhole,
}

#[derive(Debug, Clone, Copy)]
struct State {
    link: Link,
    /// Bumped by every reset: connections older than the current generation are closed.
    generation: u64,
}

/// A proxy in front of one upstream address.
#[derive(Debug)]
pub struct FlakyProxy {
    pub addr: SocketAddr,
    state: watch::Sender<State>,
    /// When bytes the broker sent while the link was up reached the device, in order.
    downstream: Arc<Mutex<Vec<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FlakyProxy {
    /// Listens on a free local port and forwards to `upstream`.
    pub async fn start(upstream: String) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (state, _) = watch::channel(State {
            link: Link::Up,
            generation: 0,
        });
        let downstream = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let state = state.clone();
            let downstream = downstream.clone();
            tokio::spawn(async move {
                while let Ok((device, _)) = listener.accept().await {
                    let now = *state.borrow();
                    if now.link == Link::Reset {
                        drop(device);
                        continue;
                    }
                    let upstream = upstream.clone();
                    let rx = state.subscribe();
                    let downstream = downstream.clone();
                    tokio::spawn(async move {
                        if let Ok(broker) = TcpStream::connect(&upstream).await {
                            let _ = device.set_nodelay(true);
                            let _ = broker.set_nodelay(true);
                            forward(device, broker, rx, now.generation, downstream).await;
                        }
                    });
                }
            })
        };
        Ok(Self {
            addr,
            state,
            downstream,
            task,
        })
    }

    pub fn set(&self, link: Link) {
        self.state.send_modify(|s| {
            if link == Link::Reset {
                s.generation += 1;
            }
            s.link = link;
        });
    }

    /// The first time bytes reached the device at or after `since`, if any.
    pub fn first_downstream_since(&self, since: Instant) -> Option<Instant> {
        let times = self
            .downstream
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let i = times.partition_point(|t| *t < since);
        times.get(i).copied()
    }
}

impl Drop for FlakyProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.set(Link::Reset);
    }
}

/// Pumps both directions until either side closes or a reset ends this connection's
/// generation.
async fn forward(
    device: TcpStream,
    broker: TcpStream,
    rx: watch::Receiver<State>,
    generation: u64,
    downstream: Arc<Mutex<Vec<Instant>>>,
) {
    let (dev_r, dev_w) = device.into_split();
    let (brk_r, brk_w) = broker.into_split();
    let up = pump(dev_r, brk_w, rx.clone(), generation, None);
    let down = pump(brk_r, dev_w, rx, generation, Some(downstream));
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut rx: watch::Receiver<State>,
    generation: u64,
    record: Option<Arc<Mutex<Vec<Instant>>>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = rx.changed() => {
                if changed.is_err() || rx.borrow().generation != generation {
                    return;
                }
                continue;
            }
        };
        let fresh = (rx.borrow().link == Link::Up).then(Instant::now);
        // Hold the bytes while the link is a blackhole; give up on a reset.
        loop {
            let s = *rx.borrow_and_update();
            if s.generation != generation {
                return;
            }
            if s.link == Link::Up {
                break;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        // Only bytes the broker sent while the link was up count as traffic flowing again:
        // bytes held through a blackhole and let go when it lifts prove nothing.
        if let (Some(times), Some(read_at)) = (&record, fresh) {
            times
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(read_at);
        }
    }
}
