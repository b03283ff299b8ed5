//! Cancel keys. Each session hands its client a key of the proxy's own (a process id and a
//! random secret); a CancelRequest carrying that key is forwarded, with the upstream
//! backend's real key, to the upstream. A request with an unknown key is dropped, as
//! PostgreSQL does, without telling the sender anything.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use rand::RngExt;
use tokio::io::AsyncWriteExt;

use crate::{config::UpstreamAddr, proxy::upstream, wire::messages};

#[derive(Debug)]
struct Entry {
    secret: Bytes,
    upstream_pid: u32,
    upstream_secret: Bytes,
}

/// The keys of every open session.
#[derive(Debug, Default)]
pub struct CancelKeys {
    keys: Mutex<HashMap<u32, Entry>>,
}

impl CancelKeys {
    /// Registers a session's upstream key and returns the secret the client gets, as long
    /// as the upstream's. Unregistered when the returned guard drops.
    pub fn register(
        self: &Arc<Self>,
        pid: u32,
        upstream_pid: u32,
        upstream_secret: Bytes,
    ) -> (Bytes, KeyGuard) {
        let mut secret = vec![0u8; upstream_secret.len()];
        rand::rng().fill(&mut secret[..]);
        let secret = Bytes::from(secret);
        self.lock().insert(
            pid,
            Entry {
                secret: secret.clone(),
                upstream_pid,
                upstream_secret,
            },
        );
        let guard = KeyGuard {
            keys: Arc::clone(self),
            pid,
        };
        (secret, guard)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Entry>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts
        // and removes), so a poisoned lock is still usable.
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forwards a client's CancelRequest. Returns whether the key was known.
    pub async fn forward(&self, upstream_addr: &UpstreamAddr, pid: u32, secret: &[u8]) -> bool {
        let target = {
            let keys = self.lock();
            match keys.get(&pid) {
                Some(e) if constant_time_eq(&e.secret, secret) => {
                    Some((e.upstream_pid, e.upstream_secret.clone()))
                }
                _ => None,
            }
        };
        let Some((upstream_pid, upstream_secret)) = target else {
            return false;
        };
        match upstream::connect(upstream_addr).await {
            Ok(mut stream) => {
                let request = messages::cancel_request(upstream_pid, &upstream_secret);
                if let Err(error) = stream.write_all(&request).await {
                    tracing::warn!(%error, "forwarding a cancel request failed");
                }
                let _ = stream.shutdown().await;
            }
            Err(error) => tracing::warn!(%error, "cannot reach the upstream to cancel"),
        }
        true
    }
}

/// Removes a session's key when the session ends.
#[derive(Debug)]
pub struct KeyGuard {
    keys: Arc<CancelKeys>,
    pid: u32,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        self.keys.lock().remove(&self.pid);
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
