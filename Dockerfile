# tandem: multi-stage build; the runtime image holds the binary and the built-in models.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tandem

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/tandem /usr/local/bin/tandem
# Found by tandem at <binary dir>/../share/tandem/models when MODEL_REPOSITORY is unset.
COPY models /usr/local/share/tandem/models
ENV HOST=0.0.0.0 PORT=9001 MODEL_CACHE_DIR=/var/cache/tandem
EXPOSE 9001 9002
# tandem is a correct PID 1: it reaps orphans and forwards SIGTERM; no tini needed.
ENTRYPOINT ["tandem"]
