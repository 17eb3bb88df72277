//! Answering control requests: each [`Request`] becomes a reply at once (a
//! view, a refusal, or nothing to change) or a change of the configuration
//! with the reply it gets once made. Without a store a change is installed
//! here at once, through [`Daemon::change_config`]; with one it is written to
//! the store and installed when its revision comes back (`store`).

use tokio::sync::oneshot;

use super::{Daemon, removals};
use crate::api::{Body, LookupView, Reply, Request};
use crate::config::Config;
use crate::model::{BackendSpec, ChangeError, CheckSpec, DesiredState, Forwarding};

/// What a request asks of the daemon.
pub(super) enum Outcome {
    /// Answered at once.
    Reply(Reply),
    /// A change: the configuration it makes, and the reply once it is made.
    Change { next: Box<Config>, done: Body },
}

/// An error as the reply says it: not found when it names what does not
/// exist, refused otherwise, with its chain.
fn refusal(error: &anyhow::Error) -> Reply {
    match error.downcast_ref::<ChangeError>() {
        Some(ChangeError::UnknownVip(_) | ChangeError::UnknownBackend { .. }) => {
            Reply::NotFound(format!("{error:#}"))
        }
        _ => Reply::Error(format!("{error:#}")),
    }
}

fn done(message: String) -> Body {
    Body::Done { message, changed: true }
}

impl Daemon {
    /// Answers `request` on `reply`, now or once its change is made.
    pub(super) fn handle(&mut self, request: Request, reply: oneshot::Sender<Reply>) {
        match self.outcome(&request) {
            Outcome::Reply(answer) => {
                let _ = reply.send(answer);
            }
            Outcome::Change { next, done } if self.store.is_some() => {
                self.submit(request, reply, *next, done, 1);
            }
            Outcome::Change { next, done } => {
                let answer = match self.change_config(|config| {
                    *config = *next;
                    Ok(())
                }) {
                    Ok(()) => {
                        if let Body::ConfigChanges { file, changes, .. } = &done {
                            for change in changes {
                                tracing::info!(config = %file.display(), %change, "configuration applied");
                            }
                        }
                        Reply::Ok(done)
                    }
                    Err(error) => refusal(&error),
                };
                let _ = reply.send(answer);
            }
        }
    }

    /// What `request` asks, validated against the running configuration.
    pub(super) fn outcome(&self, request: &Request) -> Outcome {
        self.answer(request).unwrap_or_else(|error| Outcome::Reply(refusal(&error)))
    }

    /// Whether `next` changes nothing that would be written: with a store,
    /// only the desired state is.
    fn same(&self, next: &Config) -> bool {
        match self.store {
            Some(_) => next.desired == self.config.desired,
            None => *next == self.config,
        }
    }

    /// `edit` made on a copy of the desired state: a change answered `message`
    /// once made, or, when it changes nothing, `unchanged` at once.
    fn changed(
        &self,
        edit: impl FnOnce(&mut DesiredState) -> Result<(), ChangeError>,
        message: String,
        unchanged: String,
    ) -> anyhow::Result<Outcome> {
        let mut next = self.config.clone();
        edit(&mut next.desired)?;
        self.refuse_misplaced(&next.desired)?;
        if self.same(&next) {
            let message = format!("{unchanged}: nothing changed");
            return Ok(Outcome::Reply(Reply::Ok(Body::Done { message, changed: false })));
        }
        Ok(Outcome::Change { next: Box::new(next), done: done(message) })
    }

    fn answer(&self, request: &Request) -> anyhow::Result<Outcome> {
        let limits = self.config.limits();
        let view = |body| Ok(Outcome::Reply(Reply::Ok(body)));
        let desired = &self.config.desired;
        match request.clone() {
            Request::VipAdd { vip, check, affinity, scheduler, forwarding } => {
                let check = check.applied_to(&CheckSpec::default());
                let forwarding = forwarding.applied_to(&Forwarding::default());
                if let Some(spec) = desired.vips.get(&vip) {
                    let settings = (&spec.check, spec.affinity, spec.scheduler, spec.forwarding);
                    if settings == (&check, affinity, scheduler, forwarding) {
                        return view(Body::Done {
                            message: format!("VIP {vip} already exists with these settings"),
                            changed: false,
                        });
                    }
                    anyhow::bail!(
                        "VIP {vip} already exists with other settings: change them with `lb vip set` or `lb check set`"
                    );
                }
                self.changed(
                    |state| {
                        state.add_vip(vip, check, affinity, limits)?;
                        state.configure(&vip, None, Some(scheduler), None, Some(forwarding))
                    },
                    format!("VIP {vip} added ({scheduler} scheduler, forwarding {forwarding})"),
                    String::new(),
                )
            }
            Request::VipSet { vip, affinity, scheduler, rebalance, forwarding } => {
                let spec = desired.vips.get(&vip).ok_or(ChangeError::UnknownVip(vip))?;
                let (affinity, scheduler) =
                    (affinity.unwrap_or(spec.affinity), scheduler.unwrap_or(spec.scheduler));
                let rebalance = rebalance.applied_to(&spec.rebalance);
                let forwarding = forwarding.applied_to(&spec.forwarding);
                self.changed(
                    |state| {
                        state.configure(
                            &vip,
                            Some(affinity),
                            Some(scheduler),
                            Some(rebalance),
                            Some(forwarding),
                        )
                    },
                    format!(
                        "VIP {vip} now picks backends for new flows by {scheduler} with {affinity} affinity, rebalancing {rebalance}, forwarding {forwarding}; established flows stay where they are{}",
                        if rebalance.is_on() { " unless rebalancing closes them" } else { "" }
                    ),
                    format!(
                        "VIP {vip} already picks backends by {scheduler} with {affinity} affinity, rebalancing {rebalance}, forwarding {forwarding}"
                    ),
                )
            }
            Request::CheckSet { vip, check } => {
                let current = desired.vips.get(&vip).ok_or(ChangeError::UnknownVip(vip))?;
                let check = check.applied_to(&current.check);
                let summary = serde_json::to_string(&check)?;
                self.changed(
                    |state| state.set_check(&vip, check),
                    format!("VIP {vip} check set to {summary}"),
                    format!("VIP {vip} already has the check {summary}"),
                )
            }
            Request::VipRemove { vip, force } => {
                let broken = self.breakable(&vip, None, force)?;
                self.changed(
                    |state| state.remove_vip(&vip),
                    format!("VIP {vip} removed{}", removals::broke(broken)),
                    String::new(),
                )
            }
            Request::BackendAdd { vip, address, weight } => {
                let existing = desired.vips.get(&vip).and_then(|spec| spec.backends.get(&address));
                if let Some(backend) = existing {
                    if backend.weight == weight {
                        return view(Body::Done {
                            message: format!(
                                "backend {address} already serves VIP {vip} with weight {weight}"
                            ),
                            changed: false,
                        });
                    }
                    anyhow::bail!(
                        "backend {address} already serves VIP {vip} with weight {}: change it with `lb backend set`",
                        backend.weight
                    );
                }
                self.changed(
                    |state| state.add_backend(&vip, BackendSpec::new(address, weight), limits),
                    format!("backend {address} (weight {weight}) added to VIP {vip}"),
                    String::new(),
                )
            }
            Request::BackendDrain { vip, address, draining: true } => self.changed(
                |state| state.set_draining(&vip, address, true),
                format!(
                    "backend {address} of VIP {vip} is draining: no new flows, established ones continue (watch ACTIVE FLOWS in `lb backend list`)"
                ),
                format!("backend {address} of VIP {vip} is already draining"),
            ),
            Request::BackendDrain { vip, address, draining: false } => self.changed(
                |state| state.set_draining(&vip, address, false),
                format!("backend {address} of VIP {vip} takes new flows again"),
                format!("backend {address} of VIP {vip} already takes new flows"),
            ),
            Request::BackendSet { vip, address, weight } => self.changed(
                |state| state.set_weight(&vip, address, weight),
                format!(
                    "backend {address} of VIP {vip} now has weight {weight}; established flows stay where they are"
                ),
                format!("backend {address} of VIP {vip} already has weight {weight}"),
            ),
            Request::BackendRemove { vip, address, force } => {
                let broken = self.breakable(&vip, Some(address), force)?;
                self.changed(
                    |state| state.remove_backend(&vip, address),
                    format!("backend {address} removed from VIP {vip}{}", removals::broke(broken)),
                    String::new(),
                )
            }
            Request::VipList => view(Body::Vips { vips: self.vip_views()? }),
            Request::BackendList { vip } => {
                if let Some(vip) = vip
                    && !desired.vips.contains_key(&vip)
                {
                    anyhow::bail!(ChangeError::UnknownVip(vip));
                }
                view(Body::Backends { backends: self.backend_views(vip.as_ref())? })
            }
            Request::Stats => view(Body::Stats(Box::new(self.stats_view()?))),
            Request::StoreStatus => match &self.store {
                Some(link) => view(Body::Store(link.view())),
                None => anyhow::bail!(
                    "this lb run follows no store (start it with --store etcd://HOST:PORT/PREFIX)"
                ),
            },
            Request::ConfigShow => {
                let shown = Config { source: None, store_copy: None, ..self.config.clone() };
                view(Body::Config { toml: crate::config::render(&shown) })
            }
            Request::ConfigDiff { file, text } => {
                let next = self.file_to_apply(&file, &text)?;
                let mut changes = crate::model::diff::diff(desired, &next.desired);
                self.count_broken(&mut changes);
                view(Body::ConfigChanges { file, changes, applied: false })
            }
            Request::ConfigApply { file, text, force } => {
                let mut next = self.file_to_apply(&file, &text)?;
                self.refuse_misplaced(&next.desired)?;
                let mut changes = crate::model::diff::diff(desired, &next.desired);
                self.count_broken(&mut changes);
                if let Some(refusal) = removals::file_refusal(&file, &changes)
                    && !force
                {
                    anyhow::bail!(refusal);
                }
                next = Config { desired: next.desired, source: next.source, ..self.config.clone() };
                let body = Body::ConfigChanges { file, changes, applied: true };
                if self.same(&next) {
                    return view(body);
                }
                Ok(Outcome::Change { next: Box::new(next), done: body })
            }
            Request::ConfigReload { force } => match self.reload_request(force)? {
                Ok(apply) => self.answer(&apply),
                Err(unchanged) => view(unchanged),
            },
            Request::Flows { .. } => {
                anyhow::bail!("flows are listed off the daemon's loop (see daemon::flows)")
            }
            Request::Lookup { vip, client } => {
                if client.is_ipv4() != vip.address.is_ipv4() {
                    let family = |ipv4: bool| if ipv4 { "IPv4" } else { "IPv6" };
                    anyhow::bail!(
                        "client {client} is {} but VIP {vip} is {}: no packet of that flow can reach the VIP",
                        family(client.is_ipv4()),
                        family(vip.address.is_ipv4())
                    );
                }
                let result =
                    self.reconciler.lookup(&vip, client).ok_or(ChangeError::UnknownVip(vip))?;
                view(Body::Lookup(LookupView {
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
