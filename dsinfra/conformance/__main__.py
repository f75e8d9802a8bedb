from dsinfra.conformance.runner import main

raise SystemExit(main())
