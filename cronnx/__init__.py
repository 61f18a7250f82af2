"""Cronnx: an ONNX inference server for vision models."""

__version__ = "0.1.0"
