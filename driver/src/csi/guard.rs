//! At most one operation per volume or snapshot (by name or ID) at a time:
//! a second concurrent request gets ABORTED, which CSI sidecars retry. The
//! spec asks for this; it also keeps two creates of one name from racing.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tonic::Status;

/// The set of keys with an operation in flight.
#[derive(Debug, Default, Clone)]
pub struct InFlight(Arc<Mutex<HashSet<String>>>);

/// Releases its key when dropped.
#[derive(Debug)]
pub struct Guard {
    set: InFlight,
    key: String,
}

impl InFlight {
    /// Claims `key`, or fails with ABORTED if an operation holds it.
    pub fn claim(&self, key: &str) -> Result<Guard, Status> {
        let mut set = self.0.lock().expect("in-flight set");
        if !set.insert(key.to_string()) {
            return Err(Status::aborted(format!(
                "an operation on {key} is already in progress; retry later"
            )));
        }
        Ok(Guard {
            set: self.clone(),
            key: key.to_string(),
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.set.0.lock().expect("in-flight set").remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_is_aborted_until_the_first_is_released() {
        let inflight = InFlight::default();
        let g = inflight.claim("vol").unwrap();
        assert_eq!(
            inflight.claim("vol").unwrap_err().code(),
            tonic::Code::Aborted
        );
        drop(g);
        inflight.claim("vol").unwrap();
    }
}
