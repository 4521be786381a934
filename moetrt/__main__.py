from moetrt.compiler.cli import main

if __name__ == "__main__":  # also keeps spawned worker processes (tensor parallelism) from running the CLI
    raise SystemExit(main())
