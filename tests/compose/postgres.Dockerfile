# Stands in for postgres:17 where no image registry is reachable: Debian's PostgreSQL 15 and an
# entrypoint (postgres-entrypoint.sh) that does what the official one does with the same variables.
ARG BASE=llama-gate-standin/debian:bookworm
FROM ${BASE}
# postgresql-common first, told not to make Debian's own cluster: the entrypoint makes PGDATA's.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-common \
    && sed -i 's/^#\? *create_main_cluster.*/create_main_cluster = false/' /etc/postgresql-common/createcluster.conf \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql \
    && chmod 700 /var/lib/postgresql/data
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
VOLUME /var/lib/postgresql/data
ENTRYPOINT ["docker-entrypoint.sh"]
# Fast shutdown, as the official image: it still writes a checkpoint.
STOPSIGNAL SIGINT
EXPOSE 5432
CMD ["postgres"]
