# The Argus image: every binary of the workspace (argus-bridge, argus-dlq, argus-ingest-http,
# argus-schema, argus-pki, argus-loadtest). Certificates are mounted, never baked in.
#
#   docker build -t argus:local .
#
# Stage 1 builds with the pinned Rust toolchain; stage 2 is a small Debian runtime
# that runs as the unprivileged user `argus`.
FROM rust:1.95.0-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && mkdir /out \
 && cp target/release/argus-bridge target/release/argus-dlq target/release/argus-ingest-http \
       target/release/argus-schema target/release/argus-pki \
       target/release/argus-loadtest /out/

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin argus
COPY --from=build /out/ /usr/local/bin/
USER argus:argus
EXPOSE 8080 9101
CMD ["argus-bridge", "--help"]
