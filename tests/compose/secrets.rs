//! No password comes from the repository: `scripts/compose-secrets.sh` writes random ones
//! into a file only its owner reads, and Compose refuses to start without any one of them,
//! naming it.

use std::process::Command;
use std::time::Duration;

use crate::process::{repo, run, text};
use crate::stack::{Compose, PASSWORDS, read_env_file};

#[test]
fn compose_secrets_writes_every_random_password_only_its_owner_reads() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets.env");

    let output = run(
        Command::new(repo().join("scripts/compose-secrets.sh")).arg(&file),
        Duration::from_secs(30),
    );

    assert!(output.status.success(), "{}", text(&output));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{} is readable by others", file.display());
    let written = read_env_file(&file);
    for name in PASSWORDS {
        let value = written.get(name).map(String::as_str).unwrap_or("");
        assert!(
            value.len() == 48 && value.bytes().all(|b| b.is_ascii_hexdigit()),
            "{name} is not 48 random hex digits: {value:?}"
        );
    }
}

#[test]
#[ignore = "needs docker-compose: scripts/test.sh runs it with --ignored where Docker is"]
fn compose_refuses_to_start_without_any_one_password_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.env");
    std::fs::write(&empty, "").unwrap();

    for missing in PASSWORDS {
        let others: Vec<(&str, String)> = PASSWORDS
            .iter()
            .filter(|name| **name != missing)
            .map(|name| (*name, "set".to_string()))
            .collect();
        let compose = Compose::new("ratelimiter-e2e-config", &empty, &[], &others);
        let output = compose.run(&["config"], Duration::from_secs(60)).unwrap();

        let said = text(&output);
        assert!(
            !output.status.success(),
            "Compose renders its file without {missing}"
        );
        assert!(
            said.contains(&format!(
                "{missing} is unset; run scripts/compose-secrets.sh"
            )),
            "without {missing} Compose says: {said}"
        );
    }
}
