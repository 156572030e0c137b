from ops.cli.commands import main

raise SystemExit(main())
