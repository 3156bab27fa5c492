# Strata's image: `strata` on a small Debian runtime with the tools the
# node plugin runs (mkfs, resize, blkid, losetup, fsfreeze, FUSE, iscsiadm).
#   docker build -t ghcr.io/strata-csi/strata:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY csi-proto csi-proto
COPY driver driver
RUN cargo build --release --locked -p strata --bin strata \
 && cp target/release/strata /strata

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      e2fsprogs xfsprogs util-linux mount fuse3 open-iscsi ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /strata /usr/local/bin/strata
ENTRYPOINT ["/usr/local/bin/strata"]
