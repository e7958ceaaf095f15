from fbnprune.cli import main

raise SystemExit(main())
