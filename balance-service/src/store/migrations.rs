//! The versioned schema migrations of each backend
//! (`balance-service/migrations/{sqlite,postgres}/NNNN_name.sql`), applied
//! in order at start-up and by `farebox-balance migrate`. The version a
//! database is at is the highest row of its `farebox_migrations` table (a
//! database without that table is at version 0). A database at a version
//! above [`LATEST`] is refused: it was migrated by a newer farebox-balance.

use super::{Result, StoreError};

/// One migration: its version, file name and SQL.
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

macro_rules! migration {
    ($backend:literal, $version:literal, $name:literal) => {
        Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!("../../migrations/", $backend, "/", $name)),
        }
    };
}

pub const SQLITE: &[Migration] = &[
    migration!("sqlite", 1, "0001_init.sql"),
    migration!("sqlite", 2, "0002_fleet_leases.sql"),
    migration!("sqlite", 3, "0003_budgets.sql"),
    migration!("sqlite", 4, "0004_usage_items.sql"),
];
pub const POSTGRES: &[Migration] = &[
    migration!("postgres", 1, "0001_init.sql"),
    migration!("postgres", 2, "0002_fleet_leases.sql"),
    migration!("postgres", 3, "0003_budgets.sql"),
    migration!("postgres", 4, "0004_usage_items.sql"),
];

/// The schema version this build knows (the same for both backends).
pub const LATEST: i64 = 4;

/// The table that records applied migrations (same shape on both backends).
pub const TABLE: &str = "farebox_migrations";

/// Refuses a database whose schema is newer than this build.
pub fn check_known(found: i64) -> Result<()> {
    if found > LATEST {
        return Err(StoreError::Schema(format!(
            "database schema version {found} is newer than this farebox-balance knows \
             (version {LATEST}); run a farebox-balance that knows version {found} or later"
        )));
    }
    Ok(())
}

/// The migrations to apply to a database at version `found`.
pub fn pending(all: &'static [Migration], found: i64) -> impl Iterator<Item = &'static Migration> {
    all.iter().filter(move |m| m.version > found)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Every file in migrations/<backend>/ is registered, in order, and the
    /// two backends are at the same version.
    #[test]
    fn files_match_the_lists() {
        for (backend, list) in [("sqlite", SQLITE), ("postgres", POSTGRES)] {
            let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/");
            let mut files: Vec<String> = std::fs::read_dir(format!("{dir}{backend}"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            files.sort();
            let names: Vec<&str> = list.iter().map(|m| m.name).collect();
            assert_eq!(files, names, "{backend}");
            for (i, m) in list.iter().enumerate() {
                assert_eq!(m.version, i as i64 + 1);
                assert!(m.name.starts_with(&format!("{:04}_", m.version)));
            }
            assert_eq!(list.last().map(|m| m.version), Some(LATEST));
        }
    }

    #[test]
    fn newer_schema_is_refused() {
        assert!(check_known(LATEST).is_ok());
        let e = check_known(LATEST + 1).unwrap_err().to_string();
        assert!(e.contains(&format!("version {}", LATEST + 1)), "{e}");
        assert!(e.contains(&format!("version {LATEST}")), "{e}");
    }
}
