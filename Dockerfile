# GPU worker image for running the Grad-CAM audit on Dataflow (or any Beam
# portable runner that starts Docker SDK containers).
#
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/gradcam-audit-worker:2.77.0-gpu .
#   docker push  REGION-docker.pkg.dev/PROJECT/REPO/gradcam-audit-worker:2.77.0-gpu
#   python -m pipeline ... --runner=dataflow --gpu_type nvidia-tesla-t4 \
#       --sdk_container_image=REGION-docker.pkg.dev/PROJECT/REPO/gradcam-audit-worker:2.77.0-gpu
#
# See docs/dataflow.md. What matters:
# * The Beam SDK and Python minor version in the image must equal the
#   launcher's (setup.py pins apache-beam[gcp]==2.77.0; the launcher venv is
#   Python 3.11). The base image below has both, plus the Beam boot
#   entrypoint /opt/apache/beam/boot that Dataflow starts.
# * CUDA comes as pip wheels with `tensorflow[and-cuda]`; the NVIDIA *driver*
#   comes from the VM (`worker_accelerator=...;install-nvidia-driver`).
# * The project is installed here, and the launcher still stages setup.py
#   (workflow.tar.gz) by default so the workers run the launcher's code; its
#   dependencies are already satisfied, so that install is quick.
#
# Alternative base (e.g. an NVIDIA CUDA or TensorFlow GPU image with the same
# Python minor): install apache-beam[gcp]==${BEAM_VERSION} there and add
#   COPY --from=apache/beam_python3.11_sdk:${BEAM_VERSION} /opt/apache/beam /opt/apache/beam
#   ENTRYPOINT ["/opt/apache/beam/boot"]

ARG PYTHON_VERSION=3.11
ARG BEAM_VERSION=2.77.0

FROM apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION}

ARG BEAM_VERSION
ARG TENSORFLOW_VERSION=2.21.0

# Several SDK processes share each GPU (one per vCPU by default on Dataflow):
# let none of them grab all its memory up front. The pipeline also turns on
# memory growth (transforms/model_loading.configure_devices), but only in the
# processes that load the model; the TF ops of DecodeImages may run first, or
# in processes that never load it (e.g. with --large_model).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_FORCE_GPU_ALLOW_GROWTH=true \
    TF_CPP_MIN_LOG_LEVEL=2

# Keep the base image's Beam: every later install is constrained to it.
RUN echo "apache-beam==${BEAM_VERSION}" > /opt/beam-constraints.txt \
 && python -c "import apache_beam, sys; v = apache_beam.__version__; sys.exit(0 if v == '${BEAM_VERSION}' else 'Beam ' + v + ' in the base image, expected ${BEAM_VERSION}')" \
 && pip install -c /opt/beam-constraints.txt "tensorflow[and-cuda]==${TENSORFLOW_VERSION}"

# The project (only what the workers import).
WORKDIR /opt/gradcam-audit
COPY setup.py ./
COPY pipeline/ pipeline/
COPY transforms/ transforms/
# With the hub extra and keras-hub itself (--no-deps: its own requirements pull tensorflow-text, which
# pins TensorFlow's minor version; its image models never import it), so keras_hub models load too.
RUN pip install -c /opt/beam-constraints.txt ".[hub]" \
 && pip install --no-deps "keras-hub==0.32.0" \
 && python -c "import apache_beam, tensorflow, keras_hub, pipeline.graph, transforms.model_handler; print('beam', apache_beam.__version__, 'tf', tensorflow.__version__)"

WORKDIR /
ENTRYPOINT ["/opt/apache/beam/boot"]
