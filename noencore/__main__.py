from noencore.cli import main

raise SystemExit(main())
