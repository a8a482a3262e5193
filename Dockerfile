# tandem: multi-stage image. `docker build .` builds from source (targets
# `runtime`); `--target prebuilt` packs a binary and ONNX Runtime library
# already built on the host (from a `prebuilt/` folder in the context: what
# the image test does, on a base made with debootstrap, since it cannot pull).
# See docs/DEPLOYMENT.md. The stages that need no Rust image come first, so
# the classic builder (no BuildKit) can stop at `prebuilt` without pulling one.
ARG BASE=debian:bookworm-slim
ARG RUST=rust:1-bookworm

# --- the runtime base: a non-root user owning the cache ---------------------
FROM ${BASE} AS base
RUN if [ ! -e /etc/ssl/certs/ca-certificates.crt ]; then \
      apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*; fi \
 && groupadd --system --gid 10001 tandem \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/cache/tandem --no-create-home --shell /usr/sbin/nologin tandem \
 && install -d -o 10001 -g 10001 -m 0700 /var/cache/tandem
COPY models /usr/local/share/tandem/models
ENV HOST=0.0.0.0 PORT=9001 MODEL_CACHE_DIR=/var/cache/tandem \
    ORT_DYLIB_PATH=/usr/local/lib/onnxruntime/libonnxruntime.so
EXPOSE 9001 9002
USER 10001:10001
# tandem is a correct PID 1: it reaps orphans and drains on SIGTERM; no tini needed.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=6s --start-period=30s --retries=3 CMD ["tandem", "health"]
ENTRYPOINT ["tandem"]

# --- prebuilt: the host's binary and library (prebuilt/tandem, prebuilt/lib/) --
FROM base AS prebuilt
COPY prebuilt/lib/ /usr/local/lib/onnxruntime/
COPY prebuilt/tandem /usr/local/bin/tandem

# --- build: dependencies in a layer of their own, then the sources ---------
FROM ${RUST} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY shared/Cargo.toml shared/
COPY engine-worker/Cargo.toml engine-worker/build.rs engine-worker/
COPY engine-worker/proto engine-worker/proto
COPY https-worker/Cargo.toml https-worker/
COPY supervisor/Cargo.toml supervisor/
# Empty crates with the real manifests: this layer changes only with the dependencies.
RUN for d in shared engine-worker https-worker supervisor; do mkdir -p $d/src && : > $d/src/lib.rs; done \
 && echo 'fn main() {}' > supervisor/src/main.rs \
 && mkdir -p shared/benches && for b in channel counters; do echo 'fn main() {}' > shared/benches/$b.rs; done \
 && cargo build --release --locked --bin tandem \
 && rm -rf shared/src engine-worker/src https-worker/src supervisor/src shared/benches
COPY . .
# ONNX Runtime's shared library from its PyPI wheel (the version the tests pin).
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip unzip && rm -rf /var/lib/apt/lists/* \
 && ver=$(sed -n 's/^onnxruntime==//p' scripts/requirements-test.txt) \
 && python3 -m pip download --no-deps --only-binary=:all: --dest /tmp/ort "onnxruntime==${ver}" --break-system-packages \
 && mkdir -p /out/lib && unzip -j -d /out/lib /tmp/ort/*.whl 'onnxruntime/capi/libonnxruntime*' \
 && mv /out/lib/libonnxruntime.so.* /out/lib/libonnxruntime.so
RUN touch shared/src/lib.rs engine-worker/src/lib.rs https-worker/src/lib.rs supervisor/src/lib.rs supervisor/src/main.rs \
 && cargo build --release --locked --bin tandem \
 && strip --strip-debug -o /out/tandem target/release/tandem

# --- runtime (default): built above ------------------------------------------
FROM base AS runtime
COPY --from=build /out/lib/ /usr/local/lib/onnxruntime/
COPY --from=build /out/tandem /usr/local/bin/tandem
