"""Cronnx's benchmarks. Each script runs as a file (`python bench/limit.py`); the GPU check is a
package run from the repo root (`python -m bench.gpu_check`), which this file makes `bench` a
regular package for, so that no other `bench` on the path can stand in for it."""
