# syntax=docker/dockerfile:1
# hearth's container image: built with the Rust toolchain, run from a distroless image (glibc,
# CA certificates, no shell) as a non-root user.
#
#   docker build -t hearth .
#   docker run -p 127.0.0.1:8080:8080 -p 1883:1883 -v hearth-data:/var/lib/hearth hearth
#
# As is, `hearth up` runs embedded (its own broker and store in the /var/lib/hearth volume);
# deploy/compose.yaml runs it on Mosquitto, Redis and PostgreSQL instead.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
    && install -D -m 0755 target/release/hearth target/release/hearth-bench -t /out/bin \
    && install -d -m 0700 /out/data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/bin/ /usr/local/bin/
COPY --from=build --chown=65532:65532 /out/data /var/lib/hearth
# In a container the broker and the API listen on every address: devices then log in (house id
# and a house token), anonymous clients are refused.
ENV HEARTH_DATA_DIR=/var/lib/hearth \
    HEARTH_API_LISTEN=0.0.0.0:8080 \
    HEARTH_MQTT_LISTEN=0.0.0.0:1883 \
    HEARTH_MQTT_ALLOW_ANONYMOUS=false
USER 65532:65532
WORKDIR /var/lib/hearth
VOLUME /var/lib/hearth
EXPOSE 8080 1883
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/hearth"]
CMD ["up"]
