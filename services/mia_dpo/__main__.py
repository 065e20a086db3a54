from mia_dpo.cli import main

raise SystemExit(main())
