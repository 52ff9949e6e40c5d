# GPU image for the lowc runtime and kernels: docker build -t lowc . && docker run --gpus all lowc demo
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
WORKDIR /opt/lowc
COPY pyproject.toml README.md ./
COPY lowc ./lowc
RUN pip install --no-cache-dir ".[gpu,demo]"
ENTRYPOINT ["lowc"]
CMD ["--help"]
