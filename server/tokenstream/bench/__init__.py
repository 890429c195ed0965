"""`tokenstream bench`: delivery through the real server against a bare gRPC baseline."""
