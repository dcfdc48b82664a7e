# syntax=docker/dockerfile:1
# The Egret agent image: `cargo xtask image` builds it (docker, podman or buildah).
#
# Build arguments; the defaults make the published image:
# - RUNTIME_BASE: the runtime stage's base, distroless when empty. Where gcr.io cannot be
#   reached, `cargo xtask image` passes a local equivalent made from Debian packages
#   (localhost/egret-base:bookworm).
# - AGENT_SOURCE: where /usr/local/bin/egret comes from: `build`, compiled in the build
#   stage (when empty), or `prebuilt`, the file `egret` at the root of the build context
#   (`cargo xtask image --prebuilt PATH`). The stage not chosen is skipped.
# - RUST_VERSION: the build stage's toolchain.
ARG RUNTIME_BASE=
ARG AGENT_SOURCE=
ARG RUST_VERSION=1.95

# Build stage: the toolchain `cargo xtask setup` installs (xtask/src/setup.rs), minus what
# only the tests use. setup itself is not run here: it also mounts bpffs, which a build
# container is not allowed to do. agent/tests/deploy.rs checks that the versions below
# match setup.rs.
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build

# LLVM 22 for bpf-linker (rustc 1.95 uses LLVM 22); bookworm-security carries it.
RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      llvm-22-dev libpolly-22-dev \
 && rm -rf /var/lib/apt/lists/*
# `-Z build-std=core` for the BPF target needs the standard library's source.
RUN rustup component add rust-src
# Debian ships only `llvm-config-22`; bpf-linker's build looks for `llvm-config`.
RUN PATH=/usr/lib/llvm-22/bin:$PATH LLVM_PREFIX=/usr/lib/llvm-22 \
    cargo install --locked bpf-linker --version 0.13.0 --no-default-features --features llvm-22

WORKDIR /src
COPY . .
# agent/build.rs compiles the kernel programs and embeds them in the binary.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release --package egret --bin egret \
 && install -m 0755 target/release/egret /usr/local/bin/egret

# A binary built outside, with a glibc no newer than Debian 12's (the runtime's).
FROM scratch AS prebuilt
COPY egret /usr/local/bin/egret

FROM ${AGENT_SOURCE:-build} AS agent

# Runtime: glibc and libgcc from Debian 12 (the build stage's own), nothing else: no
# shell, no package manager. The binary needs only libc and the kernel.
FROM ${RUNTIME_BASE:-gcr.io/distroless/cc-debian12} AS runtime
COPY --from=agent /usr/local/bin/egret /usr/local/bin/egret
# Root, on purpose: loading BPF programs and writing pins on the host's bpffs take uid 0
# plus capabilities, and Kubernetes gives added capabilities to a non-root user only in
# the bounding set. The DaemonSet drops every capability but the four it names.
USER 0:0
ENTRYPOINT ["/usr/local/bin/egret"]
CMD ["--help"]
