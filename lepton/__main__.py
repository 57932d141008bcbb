from lepton.entrypoints.cli.main import main

raise SystemExit(main())
