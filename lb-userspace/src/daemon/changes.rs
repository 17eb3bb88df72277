//! The one path of a change of the running configuration: validated on a
//! copy, persisted, then installed by the reconcile step; and the two ways
//! a whole file becomes the configuration (`lb config apply`, SIGHUP).

use std::path::Path;

use super::Daemon;
use crate::config::{self, Config};
use crate::health::Start;
use crate::model::ChangeError;
use crate::model::diff::Change;

impl Daemon {
    /// Applies one change: validated on a copy, persisted, then installed. A
    /// refused or failed change leaves the running and saved state as before.
    pub(super) fn change_config(
        &mut self,
        edit: impl FnOnce(&mut Config) -> Result<(), ChangeError>,
    ) -> anyhow::Result<()> {
        let mut next = self.config.clone();
        edit(&mut next)?;
        config::save(&next, &self.state_path)?;
        let previous = std::mem::replace(&mut self.config, next);
        self.checks.sync(&self.config.desired, Start::Running);
        if let Err(error) = self.reconciler.apply(&self.config.desired, &self.checks.health_map()) {
            // Put back what was running and what was saved.
            self.config = previous;
            self.checks.sync(&self.config.desired, Start::Running);
            let _ = self.reconciler.apply(&self.config.desired, &self.checks.health_map());
            let _ = config::save(&self.config, &self.state_path);
            return Err(error.into());
        }
        tracing::info!(state = %self.state_path.display(), "configuration changed and saved");
        Ok(())
    }

    /// A configuration file's text, read as `lb run --config` reads it, that
    /// can replace the running configuration: refused when it changes a
    /// setting fixed at load.
    pub(super) fn file_to_apply(&self, file: &Path, text: &str) -> anyhow::Result<Config> {
        let mut next = if self.store.is_some() {
            config::parse_source_for_fleet(text, file, &self.config.datapath)?
        } else {
            config::parse_source(text, file)?
        };
        // Backends `lb agent` registered are theirs, not the file's: a file
        // without them keeps them (unless it removes their VIP).
        if let Some(link) = &self.store {
            for (vip, address) in link.leases.keys() {
                let registered =
                    self.config.desired.vips.get(vip).and_then(|spec| spec.backends.get(address));
                if let (Some(spec), Some(backend)) = (next.desired.vips.get_mut(vip), registered) {
                    spec.backends.entry(*address).or_insert_with(|| backend.clone());
                }
            }
        }
        let differ = config::restart_settings(&self.config, &next);
        if !differ.is_empty() {
            anyhow::bail!(
                "{} changes settings fixed when lb run started ({}): nothing applied; restart lb run to change them (sizes and timeouts also need `lb unload` first)",
                file.display(),
                differ.join(", ")
            );
        }
        Ok(next)
    }

    /// Makes a configuration file's VIPs and backends the running ones, in
    /// one change: the reconcile step touches only what differs, so flows
    /// to the backends kept stay where they are.
    pub(super) fn apply_file(&mut self, file: &Path, text: &str) -> anyhow::Result<Vec<Change>> {
        let next = self.file_to_apply(file, text)?;
        let changes = crate::model::diff::diff(&self.config.desired, &next.desired);
        self.change_config(|config| {
            config.desired = next.desired;
            config.source = next.source;
            Ok(())
        })?;
        for change in &changes {
            tracing::info!(config = %file.display(), %change, "configuration applied");
        }
        Ok(changes)
    }

    /// SIGHUP: re-reads `--config` and applies it; a file with a mistake
    /// changes nothing and says why.
    pub(super) fn reload(&mut self, path: Option<&Path>) {
        let Some(path) = path else {
            tracing::warn!("SIGHUP: lb run has no --config to re-read; nothing changed");
            return;
        };
        if let Some(link) = &self.store {
            tracing::warn!(
                config = %path.display(), store = %link.config.url(),
                "SIGHUP: the VIPs come from the store, and settings fixed at start need a restart: nothing re-read (change the VIPs with lb or lb config apply)"
            );
            return;
        }
        let applied = config::read(path)
            .map_err(anyhow::Error::from)
            .and_then(|text| self.apply_file(path, &text));
        match applied {
            Ok(changes) => tracing::info!(
                config = %path.display(), changes = changes.len(),
                "SIGHUP: configuration re-read and applied"
            ),
            Err(error) => tracing::error!(
                config = %path.display(), error = format!("{error:#}"),
                "SIGHUP: configuration not applied; the running one is unchanged"
            ),
        }
    }
}
