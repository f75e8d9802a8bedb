from dsinfra.cli import main

raise SystemExit(main())
