from megasmol.cli import main

raise SystemExit(main())
