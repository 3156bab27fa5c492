//! Kubernetes Events on the PVC a volume was made for, so `kubectl
//! describe pvc` tells where Strata placed it and what it does in the
//! background. The claim is known from the parameters the provisioner adds
//! with `--extra-create-metadata`; its UID is read before each Event, since
//! `kubectl describe` lists only the Events that name the object's UID.
//! Events are best effort: one that cannot be posted is logged, never
//! fails the operation.

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::cluster::{ClaimRef, EventKind, Events};

/// Posts core/v1 Events through the API.
#[derive(Clone)]
pub struct KubeEvents {
    client: Client,
    instance: String,
}

impl std::fmt::Debug for KubeEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeEvents")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl KubeEvents {
    /// `instance` names this controller (its pod) in the Events.
    pub fn new(client: Client, instance: String) -> Self {
        KubeEvents { client, instance }
    }

    /// The Event as it is posted (`uid`: the claim's, if known).
    pub fn event(
        &self,
        claim: &ClaimRef,
        uid: Option<String>,
        kind: EventKind,
        reason: &str,
        message: &str,
    ) -> Event {
        let now = Timestamp::now();
        Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", claim.name)),
                namespace: Some(claim.namespace.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                name: Some(claim.name.clone()),
                namespace: Some(claim.namespace.clone()),
                uid,
                ..Default::default()
            },
            reason: Some(reason.into()),
            message: Some(message.into()),
            type_: Some(
                match kind {
                    EventKind::Normal => "Normal",
                    EventKind::Warning => "Warning",
                }
                .into(),
            ),
            source: Some(EventSource {
                component: Some("strata-controller".into()),
                host: None,
            }),
            reporting_component: Some(crate::DRIVER_NAME.into()),
            reporting_instance: Some(self.instance.clone()),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: Some(MicroTime(now)),
            action: Some(
                if reason.starts_with("Move") {
                    "Moving"
                } else {
                    "Provisioning"
                }
                .into(),
            ),
            count: Some(1),
            ..Default::default()
        }
    }
}

impl Events for KubeEvents {
    fn emit(&self, claim: &ClaimRef, kind: EventKind, reason: &str, message: &str) {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &claim.namespace);
        let claims: Api<PersistentVolumeClaim> =
            Api::namespaced(self.client.clone(), &claim.namespace);
        let (this, claim) = (self.clone(), claim.clone());
        let (reason, message) = (reason.to_string(), message.to_string());
        tokio::spawn(async move {
            let uid = match claims.get_opt(&claim.name).await {
                Ok(pvc) => pvc.and_then(|p| p.metadata.uid),
                Err(e) => {
                    tracing::debug!(error = %e, "reading the claim of an Event");
                    None
                }
            };
            let event = this.event(&claim, uid, kind, &reason, &message);
            if let Err(e) = api.create(&PostParams::default(), &event).await {
                tracing::warn!(error = %e, "posting an Event");
            }
        });
    }
}
