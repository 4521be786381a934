import subprocess
import sys


def test_runtime_and_reference_executor_do_not_import_torch():
    """DESIGN: the runtime needs cuda-python, numpy and the kernel library only."""
    code = ("import sys, moetrt, moetrt.engines.runtime, moetrt.engines.reference, moetrt.plugins.launch; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
