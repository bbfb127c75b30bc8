//! Compare-and-swap updates of one shared-data value. Every worker of the Envoy
//! process reads and writes the same values, so a change is computed from what
//! was read and written only if nobody wrote in between; else it is computed
//! again from the newer value.

use crate::host::Host;

/// How many times an update is tried again after losing a CAS race before it gives up.
pub const MAX_CAS_RETRIES: u32 = 64;

/// What an update makes of the value it read.
pub enum Attempt<T> {
    /// Write this value (if the value is still the one read), then return `T`.
    Write(Vec<u8>, T),
    /// Write nothing and return `T`.
    Leave(T),
}

/// Runs `attempt` on the value stored under `key` (`None`: nothing stored) until
/// what it returns is done: left as it is, or written without losing a race.
/// `None` when every try lost a race (or the host refused every write).
pub fn update<T>(
    host: &impl Host,
    key: &str,
    mut attempt: impl FnMut(Option<&[u8]>) -> Attempt<T>,
) -> Option<T> {
    for _ in 0..MAX_CAS_RETRIES {
        let (stored, cas) = match host.shared_get(key) {
            Some((bytes, cas)) => (Some(bytes), cas),
            None => (None, None),
        };
        match attempt(stored.as_deref()) {
            Attempt::Leave(done) => return Some(done),
            Attempt::Write(value, done) => {
                if host.shared_set(key, &value, cas) {
                    return Some(done);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeHost;

    #[test]
    fn a_lost_race_is_computed_again_from_the_newer_value() {
        let host = FakeHost::request("GET", "/", &[]);
        host.shared_set("k", b"1", None);
        let mut seen = Vec::new();
        let done = update(&host, "k", |stored| {
            let stored = stored.map(<[u8]>::to_vec);
            if seen.is_empty() {
                // Another worker writes between this read and this write.
                host.shared_set("k", b"2", None);
            }
            seen.push(stored.clone());
            Attempt::Write(b"3".to_vec(), stored)
        });
        assert_eq!(done, Some(Some(b"2".to_vec())));
        assert_eq!(seen, vec![Some(b"1".to_vec()), Some(b"2".to_vec())]);
        assert_eq!(host.shared_get("k").map(|(v, _)| v), Some(b"3".to_vec()));
    }

    #[test]
    fn leave_writes_nothing() {
        let host = FakeHost::request("GET", "/", &[]);
        assert_eq!(
            update(&host, "k", |stored| Attempt::Leave(stored.is_none())),
            Some(true)
        );
        assert_eq!(host.shared_get("k"), None);
    }
}
