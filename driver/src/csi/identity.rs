//! CSI Identity: who we are, what we offer, whether we are ready.

use std::collections::HashMap;

use csi_proto::csi::v1::identity_server::Identity;
use csi_proto::csi::v1::plugin_capability::{self, service, volume_expansion};
use csi_proto::csi::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};
use tonic::{Request, Response, Status};

use super::Started;
use crate::DRIVER_NAME;

/// The Identity service: ready once the services have [`Started`].
#[derive(Debug, Clone)]
pub struct IdentityService {
    started: Started,
    controller: bool,
    /// Ready regardless of `started` (a controller, which has no engine).
    always_ready: bool,
}

impl IdentityService {
    pub fn new(started: Started, controller: bool) -> Self {
        IdentityService {
            started,
            controller,
            always_ready: false,
        }
    }

    /// Probe says ready at once: for a process without an engine to open.
    pub fn always_ready(mut self) -> Self {
        self.always_ready = true;
        self
    }
}

fn service_cap(t: service::Type) -> PluginCapability {
    PluginCapability {
        r#type: Some(plugin_capability::Type::Service(
            plugin_capability::Service { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: HashMap::from([(
                "csi-spec".to_string(),
                csi_proto::CSI_SPEC_VERSION.to_string(),
            )]),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let mut capabilities = vec![service_cap(service::Type::VolumeAccessibilityConstraints)];
        if self.controller {
            capabilities.insert(0, service_cap(service::Type::ControllerService));
            // Served beside the Controller (`metadata.rs`); the
            // external-snapshot-metadata sidecar starts only if it is said.
            capabilities.push(service_cap(service::Type::SnapshotMetadataService));
            // Group snapshots (`group.rs`).
            capabilities.push(service_cap(service::Type::GroupControllerService));
        }
        capabilities.push(PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(
                plugin_capability::VolumeExpansion {
                    r#type: volume_expansion::Type::Online as i32,
                },
            )),
        });
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse {
            ready: Some(self.always_ready || self.started.is_ready()),
        }))
    }
}
