# tandem: multi-stage image. `docker build .` builds from source (targets
# `runtime`); `--target prebuilt` packs a binary and ONNX Runtime library
# already built on the host (from a `prebuilt/` folder in the context: what
# the image test does, on a base made with debootstrap, since it cannot pull).
# See docs/DEPLOYMENT.md. The stages that need no Rust image come first, so
# the classic builder (no BuildKit) can stop at `prebuilt` without pulling one.
# The runtime is `scratch` plus what tandem needs from BASE (see rootfs).
ARG BASE=debian:bookworm-slim
ARG RUST=rust:1-bookworm

# --- rootfs: the few files the runtime needs, gathered from the Debian base --
# glibc, libgcc and libstdc++ (ONNX Runtime needs it), the CA bundle (ACME,
# INDIRECT), a static busybox as the shell (for `docker exec` and the
# stages' RUN; 2 MB), the en_US.UTF-8 locale (onnxruntime's StringNormalizer
# opens it for scikit-learn text pipelines; 3 MB), the tandem user, /tmp and
# the cache. Nothing else: no package manager, no perl, no apt lists (a 12 MB
# base instead of 75-83 MB).
FROM ${BASE} AS rootfs
RUN set -e; \
    if [ ! -e /etc/ssl/certs/ca-certificates.crt ] || [ ! -x /bin/busybox ] || [ ! -e /usr/share/i18n/locales/en_US ]; then \
      apt-get update && apt-get install -y --no-install-recommends ca-certificates busybox-static locales \
      && rm -rf /var/lib/apt/lists/*; fi; \
    r=/rootfs; triplet=$(basename "$(dirname "$(readlink -f /usr/lib/*-linux-gnu/libc.so.6)")"); \
    mkdir -p $r/usr/lib/$triplet $r/usr/bin $r/usr/local/bin $r/usr/local/lib $r/usr/local/share/tandem \
      $r/etc/ssl/certs $r/tmp $r/var/cache/tandem $r/root; \
    ln -s usr/lib $r/lib; ln -s usr/bin $r/bin; ln -s usr/bin $r/sbin; \
    for l in libc.so.6 libm.so.6 libgcc_s.so.1 libstdc++.so.6 libdl.so.2 librt.so.1 libpthread.so.0; do \
      cp -L /usr/lib/$triplet/$l $r/usr/lib/$triplet/; done; \
    for ld in /lib64/ld-linux-*.so.* /lib/ld-linux-*.so.*; do \
      if [ -e "$ld" ]; then mkdir -p "$r$(dirname "$ld")"; cp -L "$ld" "$r$ld"; fi; done; \
    cp /etc/ssl/certs/ca-certificates.crt $r/etc/ssl/certs/; \
    cp /bin/busybox $r/usr/bin/busybox; \
    mkdir -p $r/usr/lib/locale && localedef -i en_US -f UTF-8 $r/usr/lib/locale/en_US.UTF-8; \
    for a in $(/bin/busybox --list); do [ -e $r/usr/bin/$a ] || ln -s busybox $r/usr/bin/$a; done; \
    printf 'root:x:0:0:root:/root:/bin/sh\ntandem:x:10001:10001:tandem:/var/cache/tandem:/sbin/nologin\n' > $r/etc/passwd; \
    printf 'root:x:0:\ntandem:x:10001:\n' > $r/etc/group; \
    printf 'hosts: files dns\n' > $r/etc/nsswitch.conf; \
    chmod 1777 $r/tmp; chmod 0700 $r/root; chown 10001:10001 $r/var/cache/tandem; chmod 0700 $r/var/cache/tandem

# --- the runtime base: that root filesystem, a non-root user owning the cache --
FROM scratch AS base
COPY --from=rootfs /rootfs/ /
COPY models /usr/local/share/tandem/models
ENV PATH=/usr/local/bin:/usr/bin HOST=0.0.0.0 PORT=9001 MODEL_CACHE_DIR=/var/cache/tandem \
    ORT_DYLIB_PATH=/usr/local/lib/onnxruntime/libonnxruntime.so
EXPOSE 9001 9002
USER 10001:10001
# tandem is a correct PID 1: it reaps orphans and drains on SIGTERM; no tini needed.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=6s --start-period=30s --retries=3 CMD ["tandem", "health"]
ENTRYPOINT ["tandem"]

# --- prebuilt: the host's binary and library (prebuilt/tandem, prebuilt/lib/) --
# The classic builder builds every stage before the target, so a plain
# `docker build .` passes through here without a prebuilt/ folder: the
# wildcard copies it when it is there (Dockerfile is only the one source that
# always exists), and the links say where the binary and library went (and
# where the built-in models are, which tandem looks for beside its real path).
FROM base AS prebuilt
COPY Dockerfile prebuilt* /usr/local/lib/tandem-prebuilt/
USER root
RUN if [ -x /usr/local/lib/tandem-prebuilt/tandem ]; then \
      ln -s /usr/local/lib/tandem-prebuilt/tandem /usr/local/bin/tandem \
      && ln -s /usr/local/lib/tandem-prebuilt/lib /usr/local/lib/onnxruntime \
      && ln -s /usr/local/share/tandem/models /usr/local/lib/tandem-prebuilt/models; \
    else echo "no prebuilt/ in the context: the prebuilt target is for scripts/test-image"; fi
USER 10001:10001

# --- chef: the Rust image plus cargo-chef (already there in a builder made for it) --
FROM ${RUST} AS chef
RUN cargo chef --version >/dev/null 2>&1 || cargo install cargo-chef --locked
WORKDIR /src

# --- planner: the dependency recipe, derived from the whole workspace ---------
# (every member's manifest, build script and target, so a new crate is never
# forgotten: the recipe is made from what is there, not from a list here)
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# --- build: dependencies in a layer of their own, then the sources ---------
FROM chef AS build
COPY --from=planner /src/recipe.json recipe.json
# This layer changes only with the dependencies (the recipe).
RUN cargo chef cook --release --locked --bin tandem --recipe-path recipe.json
COPY . .
# ONNX Runtime's shared library from its PyPI wheel (the version the tests pin).
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip unzip && rm -rf /var/lib/apt/lists/* \
 && ver=$(sed -n 's/^onnxruntime==//p' scripts/requirements-test.txt) \
 && python3 -m pip download --no-deps --only-binary=:all: --dest /tmp/ort "onnxruntime==${ver}" \
 && mkdir -p /out/lib && unzip -j -d /out/lib /tmp/ort/*.whl 'onnxruntime/capi/libonnxruntime*' \
 && mv /out/lib/libonnxruntime.so.* /out/lib/libonnxruntime.so
RUN cargo build --release --locked --bin tandem \
 && strip --strip-debug -o /out/tandem target/release/tandem

# --- runtime (default): built above ------------------------------------------
FROM base AS runtime
COPY --from=build /out/lib/ /usr/local/lib/onnxruntime/
COPY --from=build /out/tandem /usr/local/bin/tandem
