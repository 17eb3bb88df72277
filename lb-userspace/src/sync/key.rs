//! Reading the fleet's shared sync key: 64 hex characters (32 bytes), a
//! trailing newline allowed, in a file nobody but its owner (and group) may
//! read. `openssl rand -hex 32 > /etc/lb/sync.key && chmod 600 /etc/lb/sync.key`
//! makes one.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use super::wire::SyncKey;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("sync key file {}: {error}", path.display())]
    Read { path: PathBuf, error: std::io::Error },
    #[error(
        "sync key file {} is readable by others (mode {mode:o}): anyone on this host could forge flows; run chmod 600 {}",
        path.display(), path.display()
    )]
    WorldReadable { path: PathBuf, mode: u32 },
    #[error(
        "sync key file {}: expected 64 hex characters (32 bytes, e.g. from `openssl rand -hex 32`), {found}",
        path.display()
    )]
    Format { path: PathBuf, found: String },
}

pub fn load(path: &Path) -> Result<SyncKey, KeyError> {
    let read_error = |error| KeyError::Read { path: path.to_owned(), error };
    let mode = std::fs::metadata(path).map_err(read_error)?.permissions().mode() & 0o777;
    if mode & 0o004 != 0 {
        return Err(KeyError::WorldReadable { path: path.to_owned(), mode });
    }
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    parse(&text).map_err(|found| KeyError::Format { path: path.to_owned(), found })
}

/// The flow-hash seed of balancers that share `key` and set no seed: every
/// balancer started fresh with the fleet's key picks the same one, so they
/// agree on new flows and accept each other's flow sync. It is as secret as
/// the key (a keyed hash of a domain string), so nobody outside the fleet
/// can predict which source ports land on one backend.
pub fn fleet_seed(key: &SyncKey) -> u32 {
    let digest = xxhash_rust::xxh3::xxh3_64_with_secret(b"lb flow-hash seed v1", &secret(key));
    (digest >> 32) as u32 ^ digest as u32
}

/// xxh3 needs a secret of at least 136 bytes: the key, repeated.
fn secret(key: &SyncKey) -> [u8; 192] {
    let mut secret = [0u8; 192];
    for (index, byte) in secret.iter_mut().enumerate() {
        *byte = key.0[index % 32] ^ (index / 32) as u8;
    }
    secret
}

/// The key in `text`, or what was found instead.
fn parse(text: &str) -> Result<SyncKey, String> {
    let hex_text = text.strip_suffix('\n').unwrap_or(text);
    if hex_text.len() != 64 {
        return Err(format!("found {} characters", hex_text.len()));
    }
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex_text, &mut key).map_err(|error| format!("found {error}"))?;
    Ok(SyncKey(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_is_64_hex_characters_and_private() {
        let hex_key = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        assert_eq!(parse(hex_key).unwrap().0[15], 0xff);
        assert_eq!(parse(&format!("{hex_key}\n")).unwrap().0[31], 0xff);
        assert_eq!(parse(&hex_key[2..]).unwrap_err(), "found 62 characters");
        assert_eq!(parse(&format!("{hex_key}\n\n")).unwrap_err(), "found 65 characters");
        let not_hex = format!("zz{}", &hex_key[2..]);
        assert!(parse(&not_hex).unwrap_err().contains("Invalid character 'z'"));

        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), hex_key).unwrap();
        std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(load(file.path()).is_ok());
        std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = load(file.path()).unwrap_err().to_string();
        assert!(refused.contains("readable by others (mode 644)"), "{refused}");
    }

    /// Two balancers with one key derive one seed; another key, another seed.
    #[test]
    fn balancers_sharing_a_key_derive_the_same_seed() {
        let key = SyncKey([7; 32]);
        assert_eq!(fleet_seed(&key), fleet_seed(&key.clone()));
        let mut other = key.clone();
        other.0[31] ^= 1;
        assert_ne!(fleet_seed(&key), fleet_seed(&other));
        assert_ne!(fleet_seed(&key), 0);
    }
}
