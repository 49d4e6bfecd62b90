from edgemt.cli import main

raise SystemExit(main())
