# FaceMatch service image: one image, every service (`facematch embedder|indexer|bridge|topics create|...`).
#
#   docker build -t facematch .                          # CPU (onnxruntime + faiss-cpu)
#   docker build -t facematch:gpu --build-arg VARIANT=gpu .   # CUDA 12 (onnxruntime-gpu + faiss-gpu-cu12)
#
# The code is installed in place (editable) under /app: pipeline/serde.py reads the
# Avro contract from <package parent>/schemas, i.e. /app/schemas.
# The SFace/YuNet models are fetched (hash-pinned) at build time into /models.
# Plain Dockerfile syntax (no BuildKit-only features), so docker-compose 1.29 builds it too.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

# cpu | gpu
ARG VARIANT=cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FACEMATCH_MODEL_ROOT=/models \
    FACEMATCH_INDEXER_STATE_DIR=/state/indexer \
    FACEMATCH_HTTP_HOST=0.0.0.0 \
    LD_LIBRARY_PATH=/usr/local/lib/python3.11/site-packages/nvidia/cudnn/lib:/usr/local/lib/python3.11/site-packages/nvidia/cublas/lib:/usr/local/lib/python3.11/site-packages/nvidia/cuda_runtime/lib:/usr/local/lib/python3.11/site-packages/nvidia/cufft/lib:/usr/local/lib/python3.11/site-packages/nvidia/curand/lib:/usr/local/lib/python3.11/site-packages/nvidia/cuda_nvrtc/lib:/usr/local/lib/python3.11/site-packages/nvidia/nvjitlink/lib

# LD_LIBRARY_PATH: CUDA/cuDNN from the nvidia-* wheels of the gpu variant (absent in the cpu one).
# libgomp1: OpenMP runtime for faiss / onnxruntime.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 facematch \
 && useradd --system --uid 10001 --gid facematch --create-home --home-dir /home/facematch \
        --shell /usr/sbin/nologin facematch

WORKDIR /app

# Dependencies first (from pyproject.toml), so a code change does not reinstall them.
# gpu: onnxruntime/faiss-cpu are replaced by the [gpu] extra (they would share a module
# folder), and onnxruntime-gpu[cuda,cudnn] brings the CUDA 12 + cuDNN 9 wheels.
# insightface pulls the GUI opencv-python (needs libGL) and CPU onnxruntime; each shares a module
# folder with the package we want (opencv-python-headless, onnxruntime-gpu): keep only the latter.
COPY pyproject.toml ./
RUN case "$VARIANT" in cpu|gpu) ;; *) echo "VARIANT must be cpu or gpu, not '$VARIANT'" >&2; exit 2;; esac \
 && python -c "import re, sys, tomllib; \
p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
gpu = sys.argv[1] == 'gpu'; \
name = lambda r: re.split(r'[\s\[<>=!~;]', r, maxsplit=1)[0].lower(); \
reqs = [r for r in p['dependencies'] if not (gpu and name(r) in ('onnxruntime', 'faiss-cpu'))]; \
reqs += (p['optional-dependencies']['gpu'] + ['onnxruntime-gpu[cuda,cudnn]']) if gpu else []; \
print('\n'.join(reqs))" "$VARIANT" > /tmp/requirements.txt \
 && cat /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && headless="$(pip show opencv-python-headless | sed -n 's/^Version: //p')" \
 && pip uninstall -y opencv-python opencv-contrib-python \
 && pip install --no-deps --force-reinstall "opencv-python-headless==${headless}" \
 && if [ "$VARIANT" = gpu ]; then \
      ortgpu="$(pip show onnxruntime-gpu | sed -n 's/^Version: //p')" \
      && pip uninstall -y onnxruntime faiss-cpu \
      && pip install --no-deps --force-reinstall "onnxruntime-gpu==${ortgpu}"; \
    fi \
 && rm /tmp/requirements.txt

COPY . .
RUN pip install --no-deps -e . \
 && python -c "import cv2, onnxruntime, pipeline.serde as s; \
assert s.SCHEMA_DIR.is_dir(), s.SCHEMA_DIR; \
print('cv2', cv2.__version__, 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())" \
 && if [ "$VARIANT" = cpu ]; then python -c "import faiss; print('faiss', faiss.__version__)"; \
    else python -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()"; fi \
 && facematch models fetch --model-root /models \
 && chmod -R a+rX /models \
 && mkdir -p /state/indexer /state/producers \
 && chown -R facematch:facematch /state

# Named volumes mounted on /state/* start with this ownership.
VOLUME ["/state/indexer", "/state/producers"]
USER facematch
EXPOSE 5000
ENTRYPOINT ["facematch"]
CMD ["--help"]
