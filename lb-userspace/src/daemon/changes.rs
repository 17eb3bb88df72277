//! The one path of a change of the running configuration: validated on a
//! copy, persisted, then installed by the reconcile step; and the two ways
//! a whole file becomes the configuration (`lb config apply`, `lb config
//! reload` and SIGHUP).

use std::path::Path;

use super::Daemon;
use crate::api::{Body, Reply, Request};
use crate::config::{self, Config};
use crate::health::Start;
use crate::model::ChangeError;

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

    /// SIGHUP: what `lb config reload` does, said in the log.
    pub(super) fn reload(&mut self) {
        let (reply, mut answer) = tokio::sync::oneshot::channel();
        self.handle(Request::ConfigReload { force: false }, reply);
        match answer.try_recv() {
            Ok(Reply::Ok(Body::ConfigChanges { file, changes, .. })) => tracing::info!(
                config = %file.display(), changes = changes.len(),
                "SIGHUP: configuration re-read and applied"
            ),
            Ok(Reply::Ok(Body::Done { message, .. })) => tracing::info!("SIGHUP: {message}"),
            Ok(Reply::Error(error) | Reply::NotFound(error)) => tracing::error!(
                %error, "SIGHUP: configuration not applied; the running one is unchanged"
            ),
            Ok(Reply::Ok(_)) | Err(_) => {}
        }
    }

    /// `lb config reload`: the request `--config`'s text makes now, or the
    /// answer at once when there is nothing to re-read.
    pub(super) fn reload_request(&self, force: bool) -> anyhow::Result<Result<Request, Body>> {
        let Some(path) = &self.config_file else {
            anyhow::bail!(
                "this lb run has no --config to re-read: give the file to `lb config apply` instead"
            );
        };
        if let Some(link) = &self.store {
            anyhow::bail!(
                "the VIPs of this lb run come from the store at {}, and settings fixed at start need a restart: nothing re-read (change the VIPs with lb or lb config apply)",
                link.config.url()
            );
        }
        let text = config::read(path)?;
        let digest = config::ConfigSource::of(path, &text).digest;
        if self.config.source_digest() == Some(digest.as_str()) {
            let since = crate::model::diff::diff(
                &config::parse_source(&text, path)?.desired,
                &self.config.desired,
            );
            return Ok(Err(Body::Done {
                message: format!(
                    "{} is unchanged since it was applied: nothing re-read; the {} change(s) made with lb since stay, as at a restart",
                    path.display(),
                    since.len()
                ),
                changed: false,
            }));
        }
        Ok(Ok(Request::ConfigApply { file: path.clone(), text, force }))
    }
}
