# cape-static-ip runtime image: one statically linked binary, nothing else.
#
# No base image can be pulled here, so there is no builder stage: the binary is built on the
# host first (hack/image.sh, `make image` does both):
#   RUSTFLAGS="-C target-feature=+crt-static" \
#     cargo build --release --target x86_64-unknown-linux-gnu --bin cape-static-ip
# The image has no shell and no CA bundle: the binary talks only to the in-cluster apiserver
# (CA from the service account mount) and serves TLS from the mounted Secret.
FROM scratch

LABEL org.opencontainers.image.title="cape-static-ip" \
      org.opencontainers.image.description="Static IPv4 addresses for CAPE ElfMachines from metal3 IPPools (mutating admission webhook)" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY target/x86_64-unknown-linux-gnu/release/cape-static-ip /cape-static-ip

# Same uid as the Deployment's runAsUser (65532, "nonroot" in distroless images).
USER 65532:65532
EXPOSE 9443 8080
ENTRYPOINT ["/cape-static-ip"]
CMD ["serve"]
