"""The Open Inference Protocol over gRPC: Triton's `inference.GRPCInferenceService`, served by
every process that serves HTTP, over the same inference client and metadata."""
