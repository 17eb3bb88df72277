use super::*;
use crate::model::{CheckKind, Protocol};

const LIMITS: Limits = Limits { max_vips: 4, max_backends: 6 };

fn keys() -> Keys {
    Keys::new("/lb")
}

fn vip(text: &str) -> Vip {
    parse_vip(text, None).unwrap()
}

fn address(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn entries(pairs: &[(&str, &str)]) -> BTreeMap<String, Entry> {
    pairs
        .iter()
        .map(|(key, value)| {
            let entry = Entry { value: value.as_bytes().to_vec(), mod_revision: 1, lease: 0 };
            ((*key).to_owned(), entry)
        })
        .collect()
}

/// A state with the VIPs and backends given, at default settings.
fn state(vips: &[(&str, &[(&str, u32)])]) -> DesiredState {
    let mut state = DesiredState::default();
    for (name, backends) in vips {
        state.add_vip(vip(name), CheckSpec::default(), Affinity::Flow, LIMITS).unwrap();
        for (backend, weight) in *backends {
            state
                .add_backend(&vip(name), BackendSpec::new(address(backend), *weight), LIMITS)
                .unwrap();
        }
    }
    state
}

/// What the keys hold once `plan` is carried out on them, as etcd would.
fn carry_out(plan: &WritePlan, before: &BTreeMap<String, Entry>) -> BTreeMap<String, Entry> {
    let mut after = before.clone();
    for key in &plan.deletes {
        after.remove(key);
    }
    for prefix in &plan.delete_prefixes {
        after.retain(|key, _| !key.starts_with(prefix.as_str()));
    }
    for put in &plan.puts {
        let lease = before.get(&put.key).filter(|_| put.existing).map_or(0, |entry| entry.lease);
        let entry = Entry { value: put.value.clone().into_bytes(), mod_revision: 2, lease };
        after.insert(put.key.clone(), entry);
    }
    after
}

#[test]
fn every_vip_and_backend_has_one_key_as_lb_prints_it() {
    let keys = keys();
    let web = vip("198.18.0.10:80/tcp");
    let dns6 = vip("[fd00:198:18::10]:53/udp");
    assert_eq!(keys.vip(&web), "/lb/vips/198.18.0.10:80/tcp");
    assert_eq!(
        keys.backend(&dns6, address("fd00:198:18::101")),
        "/lb/backends/[fd00:198:18::10]:53/udp/fd00:198:18::101"
    );
    for key in [keys.vip(&web), keys.backend(&dns6, address("fd00:198:18::101")), keys.fleet()] {
        let named = keys.parse(&key).unwrap();
        let again = match &named {
            Named::Fleet => keys.fleet(),
            Named::Vip(vip) => keys.vip(vip),
            Named::Backend(vip, address) => keys.backend(vip, *address),
        };
        assert_eq!(again, key, "{named:?}");
    }
    assert_eq!(web.protocol, Protocol::Tcp);
}

#[test]
fn keys_that_name_nothing_or_name_it_another_way_are_refused_with_the_right_spelling() {
    let keys = keys();
    let refusal = |key: &str| keys.parse(key).unwrap_err();
    assert!(refusal("/lb/vips/198.18.0.10:80").contains("has no protocol"));
    assert_eq!(refusal("/lb/vips/198.18.0.10:80/TCP"), "write the VIP as 198.18.0.10:80/tcp");
    assert_eq!(
        refusal("/lb/vips/[FD00:198:18::10]:80/tcp"),
        "write the VIP as [fd00:198:18::10]:80/tcp"
    );
    assert_eq!(refusal("/lb/backends/[fd00::10]:80/tcp/FD00::1"), "write the address as fd00::1");
    assert!(refusal("/lb/backends/198.18.0.10:80/tcp/nobody").contains("is not an IP address"));
    assert!(refusal("/lb/weights/x").starts_with("not a key lb knows"));
}

#[test]
fn written_values_read_back_as_the_same_state() {
    let keys = keys();
    let mut next = state(&[("198.18.0.10:80/tcp", &[("198.18.1.1", 3), ("198.18.1.2", 1)])]);
    let web = vip("198.18.0.10:80/tcp");
    let spec = next.vips.get_mut(&web).unwrap();
    spec.check.kind = CheckKind::Ws;
    spec.check.path = "/socket".into();
    spec.scheduler = Scheduler::LeastConnections;
    spec.backends.get_mut(&address("198.18.1.2")).unwrap().draining = true;
    next.add_vip(vip("[fd00:198:18::10]:53/udp"), CheckSpec::default(), Affinity::ClientIp, LIMITS)
        .unwrap();

    let plan = plan(&keys, &DesiredState::default(), &next, 1);
    let assembled = assemble(&keys, &carry_out(&plan, &BTreeMap::new()), LIMITS);
    assert_eq!(assembled.refused, []);
    assert_eq!(assembled.state, next);
}

#[test]
fn a_bad_key_is_refused_alone_and_names_itself() {
    let keys = keys();
    let good = r#"{"check":{"type":"tcp"}}"#;
    let read = entries(&[
        ("/lb/vips/198.18.0.10:80/tcp", good),
        ("/lb/vips/198.18.0.11:80/tcp", "{not json"),
        ("/lb/vips/198.18.0.12:80/tcp", r#"{"check":{"fall":0}}"#),
        ("/lb/backends/198.18.0.10:80/tcp/198.18.1.1", r#"{"weight":2}"#),
        ("/lb/backends/198.18.0.10:80/tcp/198.18.1.2", r#"{"weight":999}"#),
        ("/lb/backends/198.18.0.10:80/tcp/198.18.1.3", r#"{"wieght":2}"#),
        ("/lb/backends/198.18.0.10:80/tcp/fd00::1", "{}"),
        ("/lb/backends/198.18.0.11:80/tcp/198.18.1.1", "{}"),
        ("/lb/backends/198.18.0.99:80/tcp/198.18.1.1", "{}"),
        ("/lb/junk", "x"),
    ]);
    let assembled = assemble(&keys, &read, LIMITS);
    let want = state(&[("198.18.0.10:80/tcp", &[("198.18.1.1", 2)])]);
    assert_eq!(assembled.state, want);
    let reasons: BTreeMap<&str, &str> =
        assembled.refused.iter().map(|r| (r.key.as_str(), r.reason.as_str())).collect();
    let reason =
        |key: &str| *reasons.get(key).unwrap_or_else(|| panic!("{key} not refused: {reasons:?}"));
    assert!(reason("/lb/vips/198.18.0.11:80/tcp").starts_with("value: "));
    assert_eq!(
        reason("/lb/vips/198.18.0.12:80/tcp"),
        "check fall 0 is out of range: expected 1 to 100"
    );
    assert_eq!(
        reason("/lb/backends/198.18.0.10:80/tcp/198.18.1.2"),
        "weight 999 is out of range: expected 1 to 256"
    );
    assert!(
        reason("/lb/backends/198.18.0.10:80/tcp/198.18.1.3").contains("unknown field `wieght`")
    );
    assert!(reason("/lb/backends/198.18.0.10:80/tcp/fd00::1").contains("needs the same family"));
    assert!(
        reason("/lb/backends/198.18.0.11:80/tcp/198.18.1.1")
            .contains("does not hold (or whose key is refused)")
    );
    assert!(
        reason("/lb/backends/198.18.0.99:80/tcp/198.18.1.1").contains("VIP 198.18.0.99:80/tcp")
    );
    assert!(reason("/lb/junk").starts_with("not a key lb knows"));
    assert_eq!(assembled.refused.len(), 8);
}

/// Over a limit, the keys last in key order are refused, so every balancer
/// refuses the same ones.
#[test]
fn keys_beyond_the_fleet_limits_are_the_same_on_every_balancer() {
    let keys = keys();
    let pairs: Vec<(String, &str)> = (1..=8)
        .map(|last| (format!("/lb/backends/198.18.0.10:80/tcp/198.18.1.{last}"), "{}"))
        .chain([("/lb/vips/198.18.0.10:80/tcp".to_owned(), "{}")])
        .collect();
    let read = entries(&pairs.iter().map(|(k, v)| (k.as_str(), *v)).collect::<Vec<_>>());
    let first = assemble(&keys, &read, LIMITS);
    assert_eq!(first, assemble(&keys, &read, LIMITS));
    let kept: Vec<IpAddr> =
        first.state.vips[&vip("198.18.0.10:80/tcp")].backends.keys().copied().collect();
    assert_eq!(kept, (1..=6).map(|last| address(&format!("198.18.1.{last}"))).collect::<Vec<_>>());
    assert!(
        first.refused.iter().all(|r| r.reason.contains("above the limit of 6")),
        "{:?}",
        first.refused
    );
}

#[test]
fn a_plan_touches_only_what_differs_and_says_what_it_relies_on() {
    let keys = keys();
    let base = state(&[
        ("198.18.0.10:80/tcp", &[("198.18.1.1", 1), ("198.18.1.2", 1)]),
        ("198.18.0.11:80/tcp", &[("198.18.1.1", 1)]),
    ]);
    let mut next = base.clone();
    let web = vip("198.18.0.10:80/tcp");
    next.remove_vip(&vip("198.18.0.11:80/tcp")).unwrap();
    next.set_weight(&web, address("198.18.1.1"), 5).unwrap();
    next.remove_backend(&web, address("198.18.1.2")).unwrap();
    next.add_backend(&web, BackendSpec::new(address("198.18.1.3"), 1), LIMITS).unwrap();

    let plan = plan(&keys, &base, &next, 41);
    assert_eq!(plan.base_revision, 41);
    let puts: Vec<(&str, bool)> = plan.puts.iter().map(|p| (p.key.as_str(), p.existing)).collect();
    assert_eq!(
        puts,
        [
            ("/lb/backends/198.18.0.10:80/tcp/198.18.1.1", true),
            ("/lb/backends/198.18.0.10:80/tcp/198.18.1.3", false),
        ]
    );
    assert_eq!(
        plan.deletes,
        ["/lb/vips/198.18.0.11:80/tcp", "/lb/backends/198.18.0.10:80/tcp/198.18.1.2"]
    );
    assert_eq!(plan.delete_prefixes, ["/lb/backends/198.18.0.11:80/tcp/"]);
    assert_eq!(
        plan.must_exist,
        ["/lb/backends/198.18.0.10:80/tcp/198.18.1.1", "/lb/vips/198.18.0.10:80/tcp"]
    );
    assert_eq!(plan.operations(), 5);
    assert!(super::plan(&keys, &base, &base, 41).puts.is_empty());
}

/// An agent's backend changed by an operator (drained) keeps its lease.
#[test]
fn an_update_keeps_the_lease_of_an_agents_backend() {
    let keys = keys();
    let base = state(&[("198.18.0.10:80/tcp", &[("198.18.1.1", 1)])]);
    let mut before = carry_out(&plan(&keys, &DesiredState::default(), &base, 1), &BTreeMap::new());
    before.get_mut("/lb/backends/198.18.0.10:80/tcp/198.18.1.1").unwrap().lease = 7;
    let mut next = base.clone();
    next.set_draining(&vip("198.18.0.10:80/tcp"), address("198.18.1.1"), true).unwrap();
    let after = assemble(&keys, &carry_out(&plan(&keys, &base, &next, 2), &before), LIMITS);
    assert_eq!(after.state, next);
    assert_eq!(after.leases.values().copied().collect::<Vec<_>>(), [7]);
}

#[test]
fn fleet_settings_of_another_format_are_refused() {
    let settings = FleetSettings {
        format: FORMAT,
        hash_seed: 7,
        table_size: 251,
        max_vips: 4,
        max_backends: 6,
    };
    assert_eq!(FleetSettings::decode(settings.encode().as_bytes()), Ok(settings));
    let newer = settings.encode().replace("\"format\":1", "\"format\":2");
    assert!(FleetSettings::decode(newer.as_bytes()).unwrap_err().contains("upgrade lb"));
    assert!(FleetSettings::decode(b"{}").unwrap_err().contains("missing field"));
}
