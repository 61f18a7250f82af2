"""GPU check: onnxruntime alone per batch bucket, the preprocessing limit, Cronnx served, parity.

One prepared run, side by side, for a session that has a GPU machine (one NVIDIA H200, 16 cores:
about 5 minutes with the defaults, an estimate part by part in bench/README.md, not timed on a GPU
yet; --preprocessing processes saves about 75 s), on the seven 1600 px photos of bench/photos.py
and the demo MobileNetV2 and ResNet-50 (models/<arch>-demo.onnx, built when missing: 15-25 s each).
The parts, each a module:

  onnxruntime  onnxruntime_alone.py: per batch bucket, a session that only ever runs that shape,
               with the input on the host and, on CUDA, on the device; a session alternating
               among the shapes; on CUDA per bucket CUDA graphs (cuda_graph.py) and pinned
               against pageable host memory (host_memory.py), "n/a on CPU" otherwise.
  preprocess   preprocess_limit.py: Cronnx's preprocessing of the photos on all cores, in
               threads and in processes.
  served       served.py: `cronnx serve` once per decoding placement (--preprocessing, default
               processes,fronts), loaded by `cronnx bench` at 1 and 256 clients, with the server's
               CPU and the GPU sampled (sampling.py).
  gpu          gpu.py: GPU utilisation and memory during each served run (nvidia-smi every 0.5 s);
               "n/a" without nvidia-smi.
  parity       parity.py: probabilities of the provider under test against the CPU EP, and the
               served answers of each placement against a direct CPU run.

Then targets.py computes the GPU targets, met or not, from the rows, and report.py draws the
tables. plan.py turns the command line into the run's settings, check.py runs the parts, cli.py
writes the outputs; sessions.py makes sessions as a Cronnx worker does; bench/processes.py reads
and reaps the processes the run starts.

A part that fails records its error in the JSON and the run goes on (so does a CUDA graph or a
host-memory row of one bucket); the JSON and the markdown are rewritten after every part, so a run
stopped early still leaves what it measured. Every server is stopped (its process group, by pid)
and its shared memory (/dev/shm/cronnx_<pid>_*) checked and removed; the processes this run
started are listed in the JSON, with any found alive at the end.

Run it here, from the repo root (CPU EP; the smoke run, well under a minute on 2 cores):

    .venv/bin/python -m bench.gpu_check --quick --provider cpu --json /tmp/gpu_check.json

On the GPU machine. It has Python 3.12, onnxruntime 1.30 (CPU), CUDA 13 libraries (the nvidia-*
packages of its PyTorch) and the rest of Cronnx's dependencies, but neither msgspec nor
onnxruntime-gpu, and no network. Here, once: bench/gpu_parts.sh (onnxruntime-gpu 1.31.1 and
msgspec, recompressed and cut into .whl/aa .. .whl/ad, each small enough for one call). There:
calls with carry [".whl/aa"], [".whl/ab"], [".whl/ac"] (command `true`) while the machine stays
warm, then the run, with carry [".whl/ad", "bench/photos", "models/mobilenetv2-demo.onnx"] (the
ResNet-50, 97 MiB, is built there in about 25 s) and timeout_s 600:

    bash bench/gpu_device_run.sh --json $OUT/gpu_check.json --markdown $OUT/gpu_check.md

which checks the parts, installs both packages ahead of the machine's onnxruntime, puts NVIDIA's
libraries on LD_LIBRARY_PATH and runs `python3 -m bench.gpu_check` with those arguments from the
repo root (bench/README.md, "GPU check").

With --provider auto (the default) it runs on CUDA when onnxruntime lists CUDAExecutionProvider;
a CUDA session that comes up without it (a missing library) is an error, not a silent CPU run.

Outputs: progress and the time of each part on stdout, then the markdown tables (also written to
--markdown FILE, for bench/README.md); --json FILE: everything, per part, with its error (null when
it ran), its seconds, and the raw `cronnx bench` results.

    python -m bench.gpu_check [--provider auto|cuda|cpu] [--quick] [--models mobilenetv2,resnet50]
        [--seconds S] [--clients 1,256] [--procs 4] [--preprocessing processes,fronts] [--fronts N]
        [--cuda-graph] [--pinned-ring-memory] [--parts onnxruntime,preprocess,served,gpu,parity]
        [--batch-size N] [--photos DIR] [--glob '*-1600.jpg'] [--json FILE] [--markdown FILE]
"""
