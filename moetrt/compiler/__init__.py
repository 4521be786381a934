"""Compiler: export to ONNX, the ``compile()`` pipeline (models -> passes -> engines), and the CLI.

Export and the pipeline arrive with the passes issue; the CLI lives in ``moetrt.compiler.cli``.
"""
