"""The parent side of the kernel-library A/B tools (tools/moe_ab.py, tools/gemv_ab.py): each library in its own
process (MOETRT_KERNELS_LIB), the script itself run with --child, which prints one line "RESULT <json>"."""
import json
import os
import subprocess
import sys


def main(script: str, child, sizes_var: str, default_sizes: str, doc: str):
    """The command line of ``script``: with --child, runs ``child(sizes)`` (the comma-separated integers of the
    environment variable ``sizes_var``, else ``default_sizes``); with LIB ..., yields (library name, result) per
    library, the result None (its stderr printed) where the child failed; with nothing, shows ``doc``."""
    args = sys.argv[1:]
    if not args:
        sys.exit(doc)
    if args[0] == "--child":
        sizes = tuple(int(n) for n in os.environ.get(sizes_var, default_sizes).split(","))
        print("RESULT " + json.dumps(child(sizes)))
        sys.exit(0)
    for lib in args:
        env = dict(os.environ, MOETRT_KERNELS_LIB=os.path.abspath(lib))
        p = subprocess.run([sys.executable, script, "--child"], env=env, capture_output=True, text=True)
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            print(lib, "FAILED", p.stderr[-2000:])
            yield os.path.basename(lib), None
            continue
        yield os.path.basename(lib), json.loads(line[0][7:])
