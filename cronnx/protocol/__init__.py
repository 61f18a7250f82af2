"""What every protocol handler (HTTP, gRPC) shares: the request record, the Open Inference
Protocol's checks and answers, the status table and the metadata interface."""
