//! Active flows per backend slot, counted on a blocking thread about once a
//! second and published for least-connections scheduling, `lb backend list`,
//! `lb stats` and /metrics: a walk of a million-entry flow table takes about
//! two seconds, which must never stand between a health report and the
//! failover it causes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::datapath::FlowCounter;

/// Backend slot -> active flows, as last counted.
pub type ActiveFlows = Arc<HashMap<u32, u64>>;

/// The pause between walks: a second, or as long as the last walk took, so
/// that counting a large table keeps at most half a core busy.
const PAUSE: Duration = Duration::from_secs(1);

/// Counts forever; returns only if the counting thread panicked.
pub async fn run(
    counter: Arc<FlowCounter>,
    counts: watch::Sender<ActiveFlows>,
) -> anyhow::Result<()> {
    loop {
        let walker = Arc::clone(&counter);
        let started = Instant::now();
        let counted = tokio::task::spawn_blocking(move || walker.count()).await?;
        let walk = started.elapsed();
        counts.send_replace(Arc::new(counted));
        tokio::time::sleep(PAUSE.max(walk)).await;
    }
}
