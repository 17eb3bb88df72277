//! Publishing a value through a tokio watch channel only when it changed, so
//! receivers wake for changes and not for every recomputation.

use tokio::sync::watch;

/// Replaces the channel's value with a copy of `now` and wakes receivers,
/// unless the value is already equal to `now`. Returns whether it changed.
pub fn if_changed<T: PartialEq + Clone>(sender: &watch::Sender<T>, now: &T) -> bool {
    sender.send_if_modified(|current| {
        let changed = current != now;
        if changed {
            current.clone_from(now);
        }
        changed
    })
}
