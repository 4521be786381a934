"""Version of the C ABI between the plugin specs and ``libmoetrt_kernels``.

Bumped whenever a kernel entry point changes its arguments or semantics. CMake
reads this line, so keep its form: ``PLUGIN_ABI_VERSION = <int>``.
"""

PLUGIN_ABI_VERSION = 4
