//! The rise/fall state machine of one backend (HAProxy's meaning): pure, the
//! caller supplies check outcomes and the time, and learns of transitions.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// A backend's health as the daemon tracks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Up,
    Down,
}

/// The rise/fall state machine of one backend. Pure: the caller supplies
/// outcomes and the time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthState {
    pub health: Health,
    /// Until the first outcome: that outcome decides at once (see `new_at_start`).
    pub decided: bool,
    pub successes: u32,
    pub failures: u32,
    pub since: SystemTime,
    pub last_error: Option<String>,
    /// Whether it was up at any time since the daemon started (for fail-open).
    pub ever_up: bool,
}

/// A change of health, with the reason for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub to: Health,
    pub reason: String,
}

impl HealthState {
    /// A backend added while running: down until it passes `rise` checks.
    pub fn new_added(now: SystemTime) -> Self {
        Self {
            health: Health::Down,
            decided: true,
            successes: 0,
            failures: 0,
            since: now,
            last_error: Some("not checked yet".to_owned()),
            ever_up: false,
        }
    }

    /// A backend present when the daemon starts: its first check decides, so
    /// a restart does not take healthy backends out for `rise` intervals.
    pub fn new_at_start(now: SystemTime) -> Self {
        Self { decided: false, ..Self::new_added(now) }
    }

    /// A backend of a datapath adopted from an earlier `lb run`: it was
    /// serving, so it keeps serving until its first check says otherwise.
    pub fn new_adopted(now: SystemTime) -> Self {
        Self {
            health: Health::Up,
            decided: false,
            ever_up: true,
            last_error: None,
            ..Self::new_added(now)
        }
    }

    /// An always-up backend (check kind `none`).
    pub fn new_unchecked(now: SystemTime) -> Self {
        Self { health: Health::Up, ever_up: true, last_error: None, ..Self::new_added(now) }
    }

    pub fn observe(
        &mut self,
        outcome: Result<(), String>,
        rise: u32,
        fall: u32,
        now: SystemTime,
    ) -> Option<Transition> {
        let first = !self.decided;
        self.decided = true;
        match outcome {
            Ok(()) => {
                self.successes = self.successes.saturating_add(1);
                self.failures = 0;
                self.last_error = None;
                if self.health == Health::Down && (first || self.successes >= rise) {
                    let reason = if first {
                        "first check at start passed".to_owned()
                    } else {
                        format!("{} consecutive checks passed", self.successes)
                    };
                    return Some(self.go(Health::Up, reason, now));
                }
            }
            Err(error) => {
                self.failures = self.failures.saturating_add(1);
                self.successes = 0;
                self.last_error = Some(error.clone());
                if self.health == Health::Up && (first || self.failures >= fall) {
                    let reason =
                        format!("{} consecutive checks failed, last: {error}", self.failures);
                    return Some(self.go(Health::Down, reason, now));
                }
            }
        }
        None
    }

    fn go(&mut self, to: Health, reason: String, now: SystemTime) -> Transition {
        self.health = to;
        self.since = now;
        if to == Health::Up {
            self.ever_up = true;
        }
        Transition { to, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    fn ok() -> Result<(), String> {
        Ok(())
    }
    fn failed() -> Result<(), String> {
        Err("refused".to_owned())
    }

    #[test]
    fn rise_and_fall_count_consecutive_outcomes() {
        let mut state = HealthState::new_added(T0);
        assert_eq!(state.observe(ok(), 2, 3, T0), None);
        assert_eq!(state.observe(failed(), 2, 3, T0), None, "a failure resets the rise count");
        assert_eq!(state.observe(ok(), 2, 3, T0), None);
        let up = state.observe(ok(), 2, 3, T0).expect("second consecutive success");
        assert_eq!(up.to, Health::Up);
        assert!(state.ever_up);
        assert_eq!(state.observe(failed(), 2, 3, T0), None);
        assert_eq!(state.observe(failed(), 2, 3, T0), None);
        assert_eq!(state.observe(ok(), 2, 3, T0), None, "a success resets the fall count");
        assert_eq!(state.observe(failed(), 2, 3, T0), None);
        assert_eq!(state.observe(failed(), 2, 3, T0), None);
        let down = state.observe(failed(), 2, 3, T0).expect("third consecutive failure");
        assert_eq!(down.to, Health::Down);
        assert!(
            down.reason.contains("3 consecutive checks failed, last: refused"),
            "{}",
            down.reason
        );
        assert_eq!(state.last_error.as_deref(), Some("refused"));
    }

    #[test]
    fn at_start_the_first_outcome_decides() {
        let mut up = HealthState::new_at_start(T0);
        assert_eq!(up.observe(ok(), 5, 5, T0).map(|t| t.to), Some(Health::Up));
        let mut down = HealthState::new_at_start(T0);
        assert_eq!(down.observe(failed(), 5, 5, T0), None, "already down");
        assert_eq!(down.observe(ok(), 2, 5, T0), None, "later successes need rise");
        assert_eq!(down.observe(ok(), 2, 5, T0).map(|t| t.to), Some(Health::Up));
    }
}
