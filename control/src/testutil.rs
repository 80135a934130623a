//! Helpers for the unit tests.

/// A fresh directory under the system's temp dir, removed on drop.
pub(crate) struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub(crate) fn new(prefix: &str) -> Self {
        let random = crate::pki::random_hex(8).expect("random bytes");
        let path = std::env::temp_dir().join(format!("{prefix}-{random}"));
        std::fs::create_dir_all(&path).expect("temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
