# The image every Ray pod of `llmos manifests render` runs (kubernetes.image): Ray's own image of the
# pinned Ray version, with llmos and its pinned dependencies installed, so `python -m jobs.train`,
# `python -m cluster.cli` and the Serve application `serving.app:build_app` import from any directory.
#
#   make image                                  # docker build -t llmos:0.1.0 .
#   docker tag llmos:0.1.0 REGISTRY/llmos:0.1.0 && docker push REGISTRY/llmos:0.1.0
#
# then set kubernetes.image: REGISTRY/llmos:0.1.0 in the ClusterSpec (kind: `kind load docker-image`).
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311
FROM ${RAY_IMAGE}

# One COPY per package: COPY of several directories would merge their contents into one.
COPY --chown=ray:users pyproject.toml README.md /tmp/llmos-src/
COPY --chown=ray:users cluster /tmp/llmos-src/cluster
COPY --chown=ray:users jobs /tmp/llmos-src/jobs
COPY --chown=ray:users serving /tmp/llmos-src/serving
COPY --chown=ray:users manifests /tmp/llmos-src/manifests
COPY --chown=ray:users benchmarks /tmp/llmos-src/benchmarks

# torch first, as the Makefile does; on Linux x86_64 PyPI's torch is the CUDA build GPU pools need.
RUN pip install --no-cache-dir "torch==2.13.0" \
    && pip install --no-cache-dir /tmp/llmos-src \
    && rm -rf /tmp/llmos-src
