from loden.cli import main

raise SystemExit(main())
