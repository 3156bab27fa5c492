//! Leader election through a `coordination.k8s.io/v1` Lease, so that of
//! several `strata controller` replicas exactly one acts.
//!
//! [`LeaderLease::try_acquire`] takes the Lease when nobody holds it, when
//! this process holds it (a renewal), or when the holder has not renewed
//! it for its lease duration (a takeover, counted in leaseTransitions).
//! Every write carries the resourceVersion it read, so two candidates
//! racing for an expired Lease cannot both win: the loser gets a 409 and
//! reports "not leader". The controller renews at a third of the duration
//! and exits if it cannot renew before the duration is over, so a
//! partitioned leader stops acting before another one can start.
//!
//! The holder writes its controller address into the annotation
//! [`ADDRESS_ANNOTATION`], so that the other replicas can forward the CSI
//! calls their sidecars make to it.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::cluster::election::Round;

/// The Lease annotation with the leader's controller address.
pub const ADDRESS_ANNOTATION: &str = "strata.dev/controller-address";

/// Why a round of the election could not be decided.
#[derive(Debug, thiserror::Error)]
#[error("lease {name}: {source}")]
pub struct LeaseError {
    name: String,
    #[source]
    source: kube::Error,
}

/// One candidate for the Lease `name` in `namespace`.
#[derive(Clone)]
pub struct LeaderLease {
    api: Api<Lease>,
    name: String,
    identity: String,
    address: Option<String>,
    duration: Duration,
}

impl std::fmt::Debug for LeaderLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderLease")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .field("address", &self.address)
            .field("duration", &self.duration)
            .finish_non_exhaustive()
    }
}

impl LeaderLease {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        address: Option<String>,
        duration: Duration,
    ) -> Self {
        LeaderLease {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            address,
            duration,
        }
    }

    /// How long a leader may go without renewing.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    fn err(&self, source: kube::Error) -> LeaseError {
        LeaseError {
            name: self.name.clone(),
            source,
        }
    }

    fn annotations(&self, meta: &mut ObjectMeta) {
        let annotations = meta.annotations.get_or_insert_default();
        match &self.address {
            Some(a) => annotations.insert(ADDRESS_ANNOTATION.into(), a.clone()),
            None => annotations.remove(ADDRESS_ANNOTATION),
        };
    }

    /// One round: whether this process holds the Lease now, or where the
    /// holder is.
    pub async fn try_acquire(&self) -> Result<Round, LeaseError> {
        let now = Timestamp::now();
        let pp = PostParams::default();
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.err(e))?;
        let Some(mut lease) = current else {
            let mut lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now, 0, now)),
            };
            self.annotations(&mut lease.metadata);
            return match self.api.create(&pp, &lease).await {
                Ok(_) => Ok(Round::Leading),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Round::Following(None)),
                Err(e) => Err(self.err(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let renewed = spec
            .renew_time
            .as_ref()
            .or(spec.acquire_time.as_ref())
            .map(|t| t.0);
        let lasts = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64);
        // A renewal in the future (clock skew) does not count as expired.
        let expired = renewed.is_none_or(|t| {
            let age = now.duration_since(t);
            age.is_positive() && age.unsigned_abs() > lasts
        });
        if !mine && !expired && spec.holder_identity.is_some() {
            let address = lease
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ADDRESS_ANNOTATION))
                .cloned();
            return Ok(Round::Following(address));
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine {
            spec.acquire_time.map_or(now, |t| t.0)
        } else {
            now
        };
        lease.spec = Some(self.spec(acquired, transitions, now));
        self.annotations(&mut lease.metadata);
        match self.api.replace(&self.name, &pp, &lease).await {
            Ok(_) => Ok(Round::Leading),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Round::Following(None)),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Gives the Lease up if this process holds it, so that another
    /// replica takes over at its next round instead of after the
    /// duration. `Ok(false)`: it was not ours (nothing written).
    pub async fn release(&self) -> Result<bool, LeaseError> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.err(e))?
        else {
            return Ok(false);
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.spec = Some(spec);
        if let Some(a) = lease.metadata.annotations.as_mut() {
            a.remove(ADDRESS_ANNOTATION);
        }
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            // Someone else wrote it meanwhile: it is not ours to release.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    fn spec(&self, acquired: Timestamp, transitions: i32, now: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }
}
