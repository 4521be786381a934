"""Graph rewrites over ``onnx_graphsurgeon.Graph`` and the pass manager (see docs/architecture.md)."""
