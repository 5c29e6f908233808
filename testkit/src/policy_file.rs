//! Policy files for the service under test.

/// A policy file in its own temporary folder, kept as long as the value lives.
pub struct PolicyFile {
    dir: tempfile::TempDir,
}

impl PolicyFile {
    pub fn new(text: &str) -> Self {
        let dir = tempfile::tempdir().expect("temporary folder");
        let file = Self { dir };
        file.write(text);
        file
    }

    pub fn path(&self) -> String {
        self.dir.path().join("policies.toml").display().to_string()
    }

    /// Replaces the file the way editors do: write a new file, rename it over the old.
    pub fn write(&self, text: &str) {
        let staged = self.dir.path().join("policies.toml.new");
        std::fs::write(&staged, text).expect("write the policy file");
        std::fs::rename(&staged, self.path()).expect("rename the policy file into place");
    }
}
