from dem.cli import main

raise SystemExit(main())
