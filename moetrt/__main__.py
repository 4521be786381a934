from moetrt.compiler.cli import main

raise SystemExit(main())
