//! Copies of an idempotent request that arrive on this instance while the first is still running
//! wait for it, instead of being served as an uncharged replay of a request that may yet fail.
//!
//! When the first one ends, the copy's own charge step sees the outcome: the key still charged
//! (the first succeeded) → a replay; the key released by a refund (the first failed) → the copy
//! pays and runs as the real attempt. Copies landing on other instances are not covered (see the
//! README's note on idempotency).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

type Key = (Arc<str>, String);

/// Idempotency keys in flight on this instance.
#[derive(Default)]
pub struct InFlight {
    map: Mutex<HashMap<Key, Arc<Notify>>>,
}

/// Held while the first request with a key runs; dropping it lets the waiting copies go.
pub struct Slot<'a> {
    owner: &'a InFlight,
    key: Key,
    done: Arc<Notify>,
}

impl InFlight {
    /// Waits until no other request of `account` with `key` is running here, then takes the slot.
    pub async fn enter(&self, account: &Arc<str>, key: &str) -> Slot<'_> {
        let k: Key = (account.clone(), key.to_owned());
        loop {
            let waiting = {
                let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
                match map.get(&k) {
                    // Created under the lock: it cannot miss the owner's notify_waiters.
                    Some(done) => Some(done.clone().notified_owned()),
                    None => {
                        let done = Arc::new(Notify::new());
                        map.insert(k.clone(), done.clone());
                        return Slot { owner: self, key: k, done };
                    }
                }
            };
            if let Some(w) = waiting {
                w.await;
            }
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.owner.map.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.key);
        self.done.notify_waiters();
    }
}
