//! Active flows per backend slot, counted on a blocking thread every two
//! seconds and published for `lb backend list`, `lb stats` and /metrics: a
//! walk of a million-entry flow table takes about two seconds, which must
//! never stand between a health report and the failover it causes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::datapath::FlowCounter;

/// Backend slot -> active flows, as last counted.
pub type ActiveFlows = Arc<HashMap<u32, u64>>;

const EVERY: Duration = Duration::from_secs(2);

/// Counts forever; returns only if the counting thread panicked.
pub async fn run(
    counter: Arc<FlowCounter>,
    counts: watch::Sender<ActiveFlows>,
) -> anyhow::Result<()> {
    loop {
        let walker = Arc::clone(&counter);
        let counted = tokio::task::spawn_blocking(move || walker.count()).await?;
        counts.send_replace(Arc::new(counted));
        tokio::time::sleep(EVERY).await;
    }
}
