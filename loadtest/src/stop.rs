//! A stop flag for background tasks (a watch channel under the hood).
use std::time::Duration;
use tokio::sync::watch;

#[derive(Clone)]
pub struct Stop(watch::Receiver<bool>);
pub struct StopHandle(watch::Sender<bool>);

pub fn stop_pair() -> (StopHandle, Stop) {
    let (tx, rx) = watch::channel(false);
    (StopHandle(tx), Stop(rx))
}

impl StopHandle {
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}

impl Stop {
    /// Waits up to `d`; true when stopped (or the handle was dropped).
    pub async fn wait_timeout(&self, d: Duration) -> bool {
        let mut rx = self.0.clone();
        if *rx.borrow() {
            return true;
        }
        let stopped = tokio::time::timeout(d, rx.wait_for(|v| *v)).await.is_ok();
        stopped
    }

    /// Resolves once stopped (or the handle was dropped).
    pub async fn stopped(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|v| *v).await;
    }

    pub fn is_stopped(&self) -> bool {
        *self.0.borrow()
    }
}
