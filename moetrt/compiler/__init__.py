"""Compiler: export to ONNX (``export``), the ``compile()`` pipeline models -> passes -> engines
(``pipeline``), polygraphy validation (``validate``) and the CLI (``cli``)."""
