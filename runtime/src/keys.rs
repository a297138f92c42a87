//! Key files: a secret key in its own file, readable by its owner only, never overwritten.

use std::path::Path;

use larder_shared::SecretKey;

/// Writes a key file readable by its owner only; refuses to overwrite.
pub fn write_key(path: &Path, key: &SecretKey) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(key.to_file_text().as_bytes())?;
    f.sync_all()
}
