//! What the datapath's maps cost in kernel memory, as the kernel charges
//! it: the `memlock` of every BPF map this process holds, each map counted
//! once (the flow counter holds second handles on two of them). The flow
//! table is the largest, but the unconfirmed table, the Maglev tables and
//! the sync ring add to it. Map sizes are fixed once loaded: read it then,
//! not per request (it reads the fdinfo of every open file).

use std::collections::HashMap;

/// Bytes charged for every BPF map this process holds, or None when
/// /proc does not say (no map is counted then, rather than some).
pub fn held_map_memory() -> Option<u64> {
    let mut maps: HashMap<u64, u64> = HashMap::new();
    for entry in std::fs::read_dir("/proc/self/fdinfo").ok()?.flatten() {
        // An fd closed since the listing has no fdinfo any more: skip it.
        let Ok(info) = std::fs::read_to_string(entry.path()) else { continue };
        if let Some((id, bytes)) = map_of(&info) {
            maps.insert(id, bytes);
        }
    }
    Some(maps.values().sum())
}

/// A BPF map's id and memlock from one fdinfo text; None for other fds.
fn map_of(info: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        info.lines().find_map(|line| line.strip_prefix(name)?.trim().parse::<u64>().ok())
    };
    info.lines().any(|line| line.starts_with("map_type:")).then_some(())?;
    Some((field("map_id:")?, field("memlock:")?))
}

#[cfg(test)]
mod tests {
    use super::map_of;

    #[test]
    fn only_maps_count_and_by_id() {
        let map = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nmap_type:\t9\nkey_size:\t40\nvalue_size:\t32\nmax_entries:\t1048576\nmap_flags:\t0x0\nmap_extra:\t0x0\nmemlock:\t134742016\nmap_id:\t42\nfrozen:\t0\n";
        assert_eq!(map_of(map), Some((42, 134_742_016)));
        let program = "pos:\t0\nflags:\t02000002\nprog_type:\t6\nprog_jited:\t1\nmemlock:\t4096\nprog_id:\t7\n";
        assert_eq!(map_of(program), None);
        assert_eq!(map_of("pos:\t0\nflags:\t02\n"), None);
    }
}
