from clfast.cli import main

raise SystemExit(main())
