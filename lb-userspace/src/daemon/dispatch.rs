//! Answering control requests: each [`Request`] becomes a change of the
//! desired state (through [`Daemon::change`]) or a view, and a [`Reply`].

use super::Daemon;
use crate::api::{Body, LookupView, Reply, Request};
use crate::model::{BackendSpec, ChangeError, CheckSpec};

impl Daemon {
    /// The reply to one request; errors become `Reply::Error` with their
    /// chain, or `Reply::NotFound` when they name what does not exist.
    pub(super) fn handle(&mut self, request: Request) -> Reply {
        match self.answer(request) {
            Ok(body) => Reply::Ok(body),
            Err(error) => match error.downcast_ref::<ChangeError>() {
                Some(ChangeError::UnknownVip(_) | ChangeError::UnknownBackend { .. }) => {
                    Reply::NotFound(format!("{error:#}"))
                }
                _ => Reply::Error(format!("{error:#}")),
            },
        }
    }

    fn answer(&mut self, request: Request) -> anyhow::Result<Body> {
        let limits = self.config.limits();
        let done = |message: String| Ok(Body::Done { message, changed: true });
        let unchanged = |message: String| Ok(Body::Done { message, changed: false });
        match request {
            Request::VipAdd { vip, check, affinity, scheduler } => {
                let check = check.applied_to(&CheckSpec::default());
                if let Some(spec) = self.config.desired.vips.get(&vip) {
                    if (&spec.check, spec.affinity, spec.scheduler) == (&check, affinity, scheduler)
                    {
                        return unchanged(format!("VIP {vip} already exists with these settings"));
                    }
                    anyhow::bail!(
                        "VIP {vip} already exists with other settings: change them with `lb vip set` or `lb check set`"
                    );
                }
                self.change(|state| {
                    state.add_vip(vip, check, affinity, limits)?;
                    state.set_scheduling(&vip, None, Some(scheduler))
                })?;
                done(format!("VIP {vip} added ({scheduler} scheduler)"))
            }
            Request::VipSet { vip, affinity, scheduler } => {
                self.change(|state| state.set_scheduling(&vip, affinity, scheduler))?;
                let spec = &self.config.desired.vips[&vip];
                done(format!(
                    "VIP {vip} now picks backends for new flows by {} with {} affinity; established flows stay where they are",
                    spec.scheduler, spec.affinity
                ))
            }
            Request::CheckSet { vip, check } => {
                let current =
                    self.config.desired.vips.get(&vip).ok_or(ChangeError::UnknownVip(vip))?;
                let check = check.applied_to(&current.check);
                let summary = serde_json::to_string(&check)?;
                self.change(|state| state.set_check(&vip, check))?;
                done(format!("VIP {vip} check set to {summary}"))
            }
            Request::VipRemove { vip } => {
                self.change(|state| state.remove_vip(&vip))?;
                done(format!("VIP {vip} removed"))
            }
            Request::BackendAdd { vip, address, weight } => {
                let existing =
                    self.config.desired.vips.get(&vip).and_then(|spec| spec.backends.get(&address));
                if let Some(backend) = existing {
                    if backend.weight == weight {
                        return unchanged(format!(
                            "backend {address} already serves VIP {vip} with weight {weight}"
                        ));
                    }
                    anyhow::bail!(
                        "backend {address} already serves VIP {vip} with weight {}: change it with `lb backend set`",
                        backend.weight
                    );
                }
                self.change(|state| {
                    state.add_backend(&vip, BackendSpec::new(address, weight), limits)
                })?;
                done(format!("backend {address} (weight {weight}) added to VIP {vip}"))
            }
            Request::BackendDrain { vip, address, draining } => {
                self.change(|state| state.set_draining(&vip, address, draining))?;
                if draining {
                    done(format!(
                        "backend {address} of VIP {vip} is draining: no new flows, established ones continue (watch ACTIVE FLOWS in `lb backend list`)"
                    ))
                } else {
                    done(format!("backend {address} of VIP {vip} takes new flows again"))
                }
            }
            Request::BackendSet { vip, address, weight } => {
                self.change(|state| state.set_weight(&vip, address, weight))?;
                done(format!(
                    "backend {address} of VIP {vip} now has weight {weight}; established flows stay where they are"
                ))
            }
            Request::BackendRemove { vip, address } => {
                self.change(|state| state.remove_backend(&vip, address))?;
                done(format!("backend {address} removed from VIP {vip}"))
            }
            Request::VipList => Ok(Body::Vips { vips: self.vip_views()? }),
            Request::BackendList { vip } => {
                if let Some(vip) = vip
                    && !self.config.desired.vips.contains_key(&vip)
                {
                    anyhow::bail!(ChangeError::UnknownVip(vip));
                }
                Ok(Body::Backends { backends: self.backend_views(vip.as_ref())? })
            }
            Request::Stats => Ok(Body::Stats(self.stats_view()?)),
            Request::ConfigShow => {
                let shown = crate::config::Config { source: None, ..self.config.clone() };
                Ok(Body::Config { toml: crate::config::render(&shown) })
            }
            Request::ConfigDiff { file, text } => {
                let next = self.file_to_apply(&file, &text)?;
                let changes = crate::model::diff::diff(&self.config.desired, &next.desired);
                Ok(Body::ConfigChanges { file, changes, applied: false })
            }
            Request::ConfigApply { file, text } => {
                let changes = self.apply_file(&file, &text)?;
                Ok(Body::ConfigChanges { file, changes, applied: true })
            }
            Request::Flows { .. } => {
                anyhow::bail!("flows are listed off the daemon's loop (see daemon::flows)")
            }
            Request::Lookup { vip, client } => {
                let result =
                    self.reconciler.lookup(&vip, client).ok_or(ChangeError::UnknownVip(vip))?;
                Ok(Body::Lookup(LookupView {
                    vip: vip.to_string(),
                    client,
                    backend: result.backend,
                    established_backend: result.established_backend,
                    hash: result.hash,
                    table_entry: result.table_entry,
                }))
            }
        }
    }
}
