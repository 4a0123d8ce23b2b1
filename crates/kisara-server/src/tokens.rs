//! Admin and join tokens: created on first start, kept in the data directory with mode 0600.

use std::io::Write;
use std::path::Path;

use kisara_api::agent::Secret;
use rand::RngCore;
use subtle::ConstantTimeEq;

/// A fresh random token with a recognisable prefix.
pub fn generate(prefix: &str) -> Secret {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    Secret(format!("{prefix}{}", hex::encode(bytes)))
}

/// Reads the token at `path`, or creates one there (mode 0600) when the file is missing.
pub fn load_or_create(path: &Path, prefix: &str) -> std::io::Result<Secret> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok(Secret(s.trim().to_string())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let token = generate(prefix);
    write_private(path, token.expose())?;
    Ok(token)
}

/// Writes a file only its owner can read.
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::fs::PermissionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // The mode above only applies to new files; tighten an existing one too.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

/// Compares a presented token with the expected one in constant time.
pub fn matches(expected: &Secret, presented: &str) -> bool {
    let a = expected.expose().as_bytes();
    let b = presented.as_bytes();
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_persist_with_private_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("kisara-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("admin.token");
        let _ = std::fs::remove_file(&p);
        let a = load_or_create(&p, "ksa_").unwrap();
        let b = load_or_create(&p, "ksa_").unwrap();
        assert_eq!(a, b);
        assert!(a.expose().starts_with("ksa_"));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches(&a, a.expose()));
        assert!(!matches(&a, "ksa_wrong"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
