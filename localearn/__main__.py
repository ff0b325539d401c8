from localearn.cli import main

raise SystemExit(main())
