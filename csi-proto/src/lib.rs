//! The Container Storage Interface, spec v1.12.0, and Strata's own admin,
//! agent and peer APIs, as tonic/prost code.
//!
//! `csi::v1` holds the messages, the server traits (`identity_server`,
//! `controller_server`, `node_server`, `group_controller_server`,
//! `snapshot_metadata_server`) and the matching clients. The proto file is
//! vendored in `proto/csi.proto`; its header records where each part's field
//! numbers come from.

/// A protobuf package's generated code, lints relaxed (it is generated).
macro_rules! package {
    ($(#[$doc:meta])* $name:ident, $package:literal) => {
        $(#[$doc])*
        pub mod $name {
            #[doc = concat!("Package `", $package, "`.")]
            #[allow(
                missing_docs,
                missing_debug_implementations,
                clippy::all,
                clippy::pedantic,
                rustdoc::all
            )]
            pub mod v1 {
                tonic::include_proto!($package);
            }
        }
    };
}

package!(
    /// The CSI protocol, package `csi.v1`.
    csi,
    "csi.v1"
);
package!(
    /// Strata's own API (jobs, snapshot space), package `strata.admin.v1`.
    admin,
    "strata.admin.v1"
);
package!(
    /// The node agent the controller drives, package `strata.agent.v1`.
    agent,
    "strata.agent.v1"
);
package!(
    /// Moving volumes between nodes (the controller's own API), package
    /// `strata.cluster.v1`.
    cluster,
    "strata.cluster.v1"
);
package!(
    /// The data path between nodes, package `strata.peer.v1`.
    peer,
    "strata.peer.v1"
);

/// The spec version this crate's proto matches.
pub const CSI_SPEC_VERSION: &str = "1.12.0";

/// The encoded `FileDescriptorSet` of `proto/csi.proto` (for gRPC reflection
/// and for the wire-compatibility test).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/csi_descriptor.bin"));
